"""The lifecycle study's GPU script (bench/lifecycle_study.py) end to end on a tiny model: the experts it trains, the
training-free data routers, and pruning 5 -> 4 -> 3 experts, with the rows and goals it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_study import tiny_seed_and_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/usr/share/games/fortunes/de").is_dir(), reason="needs Debian's fortunes-de")
def test_the_study_reports_data_routers_and_pruning(tmp_path):
    seed, data = tiny_seed_and_data(tmp_path)
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lifecycle_study.py"), "--data", str(data), "--model", str(seed),
         "--workdir", str(tmp_path / "work"), "--out", str(out), "--expert-tokens", "2048", "--seq-len", "32",
         "--batch-size", "8", "--validation-blocks", "4", "--router-sequences", "4", "--router-length", "16",
         "--prune-sequences", "4", "--device", "cpu"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    names = ["code", "german", "arithmetic"]
    assert set(summary["experts"]) == set(names)
    models = summary["models"]
    assert set(models) == {"traditional, data router, top-1", "traditional, data router, top-2",
                           "traditional, oracle routing (others opted out), top-1",
                           "btx over attention and FFN, data router, top-1",
                           "traditional + seed, random router", "traditional + seed, data router",
                           "traditional + seed, data router, pruned to 3", "traditional + seed, data router, pruned to 2"}
    assert len(models["traditional + seed, data router"]["experts"]) == 4  # three domains' experts and the seed
    once, twice = models["traditional + seed, data router, pruned to 3"], models[
        "traditional + seed, data router, pruned to 2"]  # each label names the experts left
    assert len(once["experts"]) == 3 and len(twice["experts"]) == 2
    assert set(twice["experts"]) < set(once["experts"])
    # the expert pruned first is the one its usage put last
    usage = once["usage_before"]
    removed = set(models["traditional + seed, data router"]["experts"]) - set(once["experts"])
    assert removed == {min(usage, key=usage.get)}
    oracle = models["traditional, oracle routing (others opted out), top-1"]["perplexity"]
    assert oracle.pop("mixed") is None  # each domain read on its own expert: no mixed reading
    for row in models.values():
        assert set(row["perplexity"]) >= set(names)
        assert all(0 < value < 1e6 for value in row["perplexity"].values() if value is not None)
        assert isinstance(row["goal_every_domain_within_1.1x"], bool)
    assert "Goals (issue #39)" in (out / "results.md").read_text()
