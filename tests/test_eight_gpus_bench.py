"""The Eight issue's node script (bench/eight_gpus.py) end to end on a tiny shape on CPU: sources composed in a fresh
process and deleted, one training launch measured, the report's rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "eight_gpus.py"


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, cwd=ROOT)


def test_compose_then_train_then_report(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    composed = _run("compose", "--workdir", str(work), "--out", str(out), "--method", "btx", "--experts", "3",
                    "--tiny")  # and a tokenizer trained there
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert not list(work.glob("expert*")), "the sources are deleted once composed"
    assert json.loads((work / "composed-btx" / "config.json").read_text())["expert_names"] == ["e0", "e1", "e2"]
    trained = _run("train", "--workdir", str(work), "--out", str(out), "--method", "btx", "--policy", "routers",
                   "--gpus", "1", "--batch", "2", "--block", "32", "--steps", "4", "--tiny")
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((out / "eight_gpus.json").read_text())
    (compose_row,), (train_row,) = results["compose"], results["train"]
    assert compose_row["experts"] == 3 and compose_row["output_bytes"] > 0 and compose_row["compose_peak_rss_gb"] > 0
    assert train_row["outcome"] == "ran", train_row.get("error")
    assert train_row["tokens_per_second"] > 0 and 0 < train_row["mfu"]
    assert not (work / "runs" / "btx-routers-1gpu" / "out").exists(), "the trained copy is deleted after the run"
    table = (out / "eight_gpus.md").read_text()
    assert "| btx | routers | 1 |" in table and "| btx (tiny) | 3 |" in table
    missing = _run("train", "--workdir", str(work), "--out", str(out), "--method", "traditional", "--tiny")
    assert missing.returncode != 0 and "compose --method traditional" in missing.stderr
