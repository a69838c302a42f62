"""The SmolLM2 reproduction's pipeline (examples/btx_smollm2), end to end on a tiny model: a smoke test of the
scripts that run on the GPU, with the same steps and outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from mixturekit.demo.domains import build_domains
from mixturekit.demo.tiny_experts import train_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "btx_smollm2"


@pytest.mark.skipif(not Path("/usr/share/games/fortunes/de").is_dir(), reason="needs Debian's fortunes-de")
def test_the_pipeline_runs_and_reports_every_model(tmp_path):
    domains = build_domains(chars_per_domain=20_000)
    tokenizer = train_tokenizer([t for d in domains.values() for t in d.train] + ["Äpfel Öl über"], 300)
    seed = tmp_path / "seed"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(seed)
    tokenizer.save_pretrained(seed)
    data = tmp_path / "data"
    run = [sys.executable, str(EXAMPLE / "prepare.py"), "--out", str(data), "--tokenizer", str(seed),
           "--max-chars", "40000"]
    subprocess.run(run, check=True, capture_output=True, text=True)
    out = tmp_path / "out"
    run = [sys.executable, str(EXAMPLE / "pipeline.py"), "--data", str(data), "--model", str(seed), "--workdir",
           str(tmp_path / "work"), "--out", str(out), "--expert-tokens", "2048", "--moe-tokens", "2048",
           "--seq-len", "32", "--batch-size", "8", "--validation-blocks", "4", "--device", "cpu"]
    finished = subprocess.run(run, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    expected = {"seed", "expert code", "expert german", "expert arithmetic", "dense data-matched",
                "sparse upcycling", "traditional", "btx", "bts"}
    assert expected <= set(summary["results"])
    for row in summary["results"].values():
        assert set(row) == {"code", "german", "arithmetic", "mixed"}
        assert all(0 < value < 1e6 for value in row.values())
    # Training moved every trained model away from the seed, and BTS at composition is exactly its hub (the seed).
    seed_row = summary["results"]["seed"]
    assert summary["results"]["bts (as composed)"]["mixed"] == pytest.approx(seed_row["mixed"], rel=1e-4)
    assert summary["results"]["expert code"]["code"] != seed_row["code"]
    for label in ("traditional", "btx"):
        per_domain = summary["specialisation"][label]
        assert set(per_domain) == {"code", "german", "arithmetic"}
        assert all(0.0 <= share <= 1.0 for shares in per_domain.values() for share in shares)
    assert "| sparse upcycling |" in (out / "results.md").read_text()
    assert (out / "routing-report.html").stat().st_size > 1000
