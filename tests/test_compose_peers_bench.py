"""Smoke test of bench/compose_peers.py --quick, our side only (the peers need their own environments): it makes
the sources, composes in a fresh process under /usr/bin/time (or, where it is missing, a forked wait4), reports a
positive wall time and peak RSS, and leaves no output behind. The comparison itself is in docs/performance.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


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


def test_without_gnu_time_a_forked_wait4_reads_the_command_peak_memory(tmp_path, monkeypatch):
    """Container images often lack /usr/bin/time: the fallback must report the command's own peak (not the parent's)
    and its failure."""
    sys.path.insert(0, str(REPO / "bench"))
    import compose_peers

    monkeypatch.setattr(compose_peers, "rusage_wrapper",
                        lambda report: [sys.executable, "-S", "-c", compose_peers.WAIT4, str(report)])
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # resident: the parent's peak must not leak into the child's
    allocate = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    result = compose_peers.timed([sys.executable, "-c", allocate], compose_peers.child_env(), tmp_path)
    assert 200 * 2**20 < result["peak_rss"] < 380 * 2**20 and result["user_s"] >= 0
    with pytest.raises(RuntimeError, match=r"failed \(3\)"):
        compose_peers.timed([sys.executable, "-c", "raise SystemExit(3)"], compose_peers.child_env(), tmp_path)
    del ballast
