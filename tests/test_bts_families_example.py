"""The cross-family BTS demonstration (examples/bts_families), end to end at a tiny size on the CPU (`--quick`): a
smoke test of the script that runs on the GPU, with the same steps and outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "bts_families" / "stitch_other_family.py"


def test_quick_run_stitches_a_gemma_expert_to_a_llama_hub(tmp_path):
    run = [sys.executable, str(SCRIPT), "--quick", "--expert-family", "gemma3_text", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "out")]
    finished = subprocess.run(run, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    results = summary["results"]
    assert list(results) == ["hub", "expert (gemma3_text, code)", "bts (as composed)", "bts (stitches trained)"]
    assert summary["expert"] == {"model_type": "gemma3_text", "hidden_size": 48, "num_hidden_layers": 3,
                                 "domain": "code"}
    for row in results.values():
        assert set(row) == {"code", "prose", "arithmetic", "mixed"} and all(0 < v < 1e6 for v in row.values())
    # As composed, BTS is exactly its hub; the expert trained on code only is another model.
    assert results["bts (as composed)"] == pytest.approx(results["hub"], rel=1e-5)
    assert results["expert (gemma3_text, code)"]["code"] != pytest.approx(results["hub"]["code"], rel=1e-3)
    assert results["bts (stitches trained)"] != results["bts (as composed)"]
    assert "| bts (stitches trained) |" in (tmp_path / "out" / "results.md").read_text()
    composed = json.loads((tmp_path / "w" / "composed" / "config.json").read_text())
    assert composed["text_config"]["model_type"] == "llama"
    assert [c["model_type"] for c in composed["expert_configs"]] == ["gemma3_text"]
