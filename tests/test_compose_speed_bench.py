"""Smoke test of bench/compose_speed.py --quick: it runs, and every row has positive finite ratios.

No timing thresholds: the quick models are ~5 MB, where fixed costs (planning, process start) dominate and the
compose / floor ratio means nothing; the full run and its numbers are in docs/performance.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").is_file() or "VmHWM" not in Path("/proc/self/status").read_text(),
                       reason="needs Linux /proc/self/status VmHWM"),
]


def test_quick_speed_bench_reports_positive_finite_ratios(tmp_path):
    raw = tmp_path / "speed.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compose_speed.py"), "--quick", "--experts", "2", "4",
         "--workdir", str(tmp_path / "work"), "--json", str(raw)],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads(raw.read_text())
    runs, summary = report["runs"], report["summary"]
    cells = [("traditional", 2), ("traditional", 4), ("btx", 2), ("btx", 4)]
    assert [(r["method"], r["experts"]) for r in runs] == cells
    assert [(s["method"], s["experts"]) for s in summary] == cells
    for run in runs:
        for value in (run["ratio"], run["compose"]["wall_s"], run["floor"]["wall_s"], run["compose"]["peak_rss"]):
            assert math.isfinite(value) and value > 0, run
        assert run["floor"]["read_bytes"] == run["input_bytes"]
        assert run["floor"]["write_bytes"] == sum(run["compose"]["shard_sizes"]) > 0
    for entry in summary:
        assert all(math.isfinite(v) and v > 0 for v in (entry["ratio"], entry["rss_vs_first"])), entry

    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) == len(cells)
    for row in rows:
        for column in ("compose / floor", "RSS vs 2"):
            value = float(row[header.index(column)])
            assert math.isfinite(value) and value > 0, (column, row)

    leftovers = [p.name for p in (tmp_path / "work").iterdir() if not p.name.startswith("source-")]
    assert not leftovers, leftovers  # composed outputs and floor files are deleted after each cell
