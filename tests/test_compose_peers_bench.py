"""Smoke test of bench/compose_peers.py --quick, our side only (the peers need their own environments): it makes
the sources, composes in a fresh process under /usr/bin/time, reports a positive wall time and peak RSS, and leaves
no output behind. The comparison itself is in docs/performance.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/time").is_file(), reason="needs GNU time (/usr/bin/time)"),
]


def test_quick_peers_bench_runs_ours(tmp_path):
    raw = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compose_peers.py"), "--quick", "--repeats", "1", "--no-imports",
         "--workdir", str(tmp_path / "work"), "--json", str(raw)],
        capture_output=True, text=True, cwd=str(REPO), timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(raw.read_text())
    assert [r["tool"] for r in report["runs"]] == ["ours"]
    (run,) = report["runs"]
    assert math.isfinite(run["wall_s"]) and run["wall_s"] > 0
    assert run["peak_rss"] > 50e6 and run["weight_bytes"] > 0
    assert [s["tool"] for s in report["summary"]] == ["ours"]
    assert any(line.startswith("| ours") for line in done.stdout.splitlines())
    assert not list((tmp_path / "work").glob("out-*"))  # each output is deleted after its run
