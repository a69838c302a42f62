"""The built-in demo end to end in quick mode: real training, real composition, numbers that make sense."""

from __future__ import annotations

import math

from moekit.demo import run_demo


def test_quick_demo_trains_experts_that_beat_the_seed_and_composes_them(tmp_path):
    result = run_demo(tmp_path, quick=True, progress=False)
    domains = ["code", "prose", "arithmetic"]
    models = ["seed", *(f"expert:{d}" for d in domains), "btx", "traditional", "btx+routers", "traditional+routers"]
    table = result["perplexity"]

    assert result["domains"] == domains
    assert list(table) == models
    for model in models:
        assert set(table[model]) == {*domains, "mixed"}
        assert all(math.isfinite(value) and value > 1 for value in table[model].values()), (model, table[model])
        assert model in result["table"]
    # Branch-train: each expert, trained further on its own domain, beats the seed there (by far, even in quick mode).
    for domain in domains:
        assert table[f"expert:{domain}"][domain] < 0.8 * table["seed"][domain], (domain, table)
    # Experts from one seed average into a generalist: either composition beats every single expert on mixed text.
    best_expert = min(table[f"expert:{d}"]["mixed"] for d in domains)
    for method in ("btx", "traditional", "btx+routers", "traditional+routers"):
        assert table[method]["mixed"] < best_expert, (method, table)
    # Router training lowers the mixed perplexity of each composition.
    for method in ("btx", "traditional"):
        assert table[f"{method}+routers"]["mixed"] < table[method]["mixed"], (method, table)
    # Where each domain's tokens go: a share per expert, summing to one.
    for name in ("btx+routers", "traditional+routers"):
        assert set(result["routing"][name]) == set(domains)
        assert all(math.isclose(sum(row), 1.0, rel_tol=1e-5) for row in result["routing"][name].values())
    assert not result["reused_experts"]
    # The routing report and plot are written and named in the output.
    from pathlib import Path

    assert Path(result["report"]).read_text().count('class="tok"') > 10 and result["report"] in result["table"]
    assert Path(result["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    title = Image.open(result["png"]).text["Title"]  # the figure names its model and what it analysed
    assert "btx+routers" in title and "first 128 tokens of one validation text per domain" in title, title
    assert "one validation text per domain, so its shares differ" in result["table"]

    # A second run reuses the cached experts and gives the same numbers.
    again = run_demo(tmp_path, quick=True, progress=False)
    assert again["reused_experts"]
    for model in models:
        for column, value in table[model].items():
            assert math.isclose(again["perplexity"][model][column], value, rel_tol=1e-5), (model, column)
