"""The study's scaling view: mixed held-out perplexity per method against total training tokens and against
GPU-seconds, over several budgets of expert training (one pipeline.py results.json per budget).

    python examples/btx_smollm2/scaling.py docs/results/study/e{1,2.5,5}M/results.json --out docs/results/study/

Writes `scaling.png` and `scaling.md` (one row per method, one column per budget, and where composing overtakes
each alternative, if it does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMPOSITIONS = ("traditional", "btx", "bts")  # a label starting with one of these is a composition (its variants too)


def is_composition(method: str) -> bool:
    return method.startswith(COMPOSITIONS)


def load_runs(paths: list[Path]) -> list[dict]:
    runs = [json.loads(path.read_text()) for path in paths]
    return sorted(runs, key=lambda run: run["settings"]["expert_tokens"])


def methods(runs: list[dict]) -> list[str]:
    """Trained models of any run (not the as-composed / as-merged starting points, not single experts), in the order
    of the run that has the most; a method run at some budgets only (the alpha study) keeps its row."""
    order = max((list(run["results"]) for run in runs), key=len)
    order += [m for run in runs for m in run["results"] if m not in order]
    return [m for m in order if "(as " not in m and not m.startswith("expert ")]


def mixed(run: dict, method: str) -> float | None:
    """Mixed held-out perplexity of a method in one run, None where that budget did not train it."""
    return run["results"][method]["mixed"] if method in run["results"] else None


def budget(run: dict) -> str:
    return f"{run['settings']['expert_tokens'] / 1e6:g}M"


def table(runs: list[dict]) -> str:
    names = methods(runs)
    best = [min(v for m in names if (v := mixed(run, m)) is not None) for run in runs]
    lines = ["| method | " + " | ".join(f"{budget(run)} per expert" for run in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for method in names:
        cells = []
        for run, lowest in zip(runs, best):
            value = mixed(run, method)
            cells.append("—" if value is None else f"**{value:.3f}**" if value == lowest else f"{value:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overtakes(runs: list[dict]) -> list[str]:
    """Per alternative: the budgets at which the best composition beats it on mixed perplexity."""
    names = methods(runs)
    best_composition = [min((v for m in names if is_composition(m) and (v := mixed(run, m)) is not None),
                            default=None) for run in runs]
    lines = []
    for other in names:
        if is_composition(other):
            continue
        wins, budgets = [], []
        for run, composed in zip(runs, best_composition):
            if mixed(run, other) is None:
                continue
            budgets.append(budget(run))
            if composed is not None and composed < mixed(run, other):
                wins.append(budget(run))
        lines.append(f"- {other}: the best composition is better at {', '.join(wins) if wins else 'no budget'}"
                     + ("" if len(budgets) == len(runs) else f" (run at {', '.join(budgets)} only)"))
    return lines


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    shown = [m for m in methods(runs) if m != "seed" and "alpha" not in m]  # the alpha study has its own table
    colours = plt.get_cmap("tab10")
    for index, method in enumerate(shown):
        style = "-o" if is_composition(method) else "--s"
        for axis, key in zip(axes, ("total_train_tokens", "gpu_seconds")):
            ran = [run for run in runs if method in run["results"]]
            xs = [run["costs"][method][key] / (1e6 if key == "total_train_tokens" else 1) for run in ran]
            ys = [run["results"][method]["mixed"] for run in ran]
            axis.plot(xs, ys, style, label=method, color=colours(index % 10))
    for axis in axes:  # the seed costs nothing: a line, not a point on a log axis
        axis.axhline(runs[0]["results"]["seed"]["mixed"], color="grey", linestyle=":", label="seed")
    for axis, label in zip(axes, ("total training tokens (M), experts included", "GPU-seconds, experts included")):
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mixed held-out perplexity (lower is better)")
    axes[1].legend(fontsize=7)
    figure.suptitle("Composing against the alternatives, per budget of expert training")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.json of pipeline.py, one per budget")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = load_runs(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(["Mixed held-out perplexity per budget of expert training:", "", table(runs), "",
                      *overtakes(runs)])
    (args.out / "scaling.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {plot(runs, args.out / 'scaling.png')}")


if __name__ == "__main__":
    main()
