"""Every benchmark script imports against the package as it is now: they run only on a GPU or by hand, so a renamed
module (bench/moe_baselines.py once imported a table that had moved) would otherwise go unnoticed until a GPU call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_EVERY_SCRIPT = """
import importlib.util, sys, traceback
failed = []
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("bench_" + path.rsplit("/", 1)[-1][:-3], path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception:
        failed.append(path + ": " + traceback.format_exc(limit=2))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_bench_script_imports():
    scripts = sorted(str(p) for p in (ROOT / "bench").glob("*.py"))
    assert len(scripts) > 20
    finished = subprocess.run([sys.executable, "-c", IMPORT_EVERY_SCRIPT, *scripts], cwd=ROOT / "bench",
                              capture_output=True, text=True, env={**os.environ,
                                                                   "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}"})
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-2000:]
