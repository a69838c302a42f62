"""`moekit benchmark PATH --tasks ...`: accuracy on lm-evaluation-harness tasks for a composition, each of its
experts and its base, in one table: did composing beat the models it was made from on the tasks users care about?

Every model is scored by lm-evaluation-harness's own `hf` model on the same device and dtype, one after the other
(freeing each before the next); the table has one row per model and one column per task, the best per column marked.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .devices import default_dtype, resolve_device
from .errors import MixtureKitError, RecipeError
from .loading import stored_dtype
from .recipe import load_recipe
from .runtime.assembly.config import require_composed
from .sources import resolve_source

RECIPE_FILE = "mixturekit_recipe.yaml"
# The metric shown for a task: the first of these it reports (accuracy first: this is not a perplexity table).
METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "bleu", "word_perplexity", "perplexity")
LOWER_IS_BETTER = {"word_perplexity", "perplexity", "byte_perplexity", "bits_per_byte"}


class BenchmarkError(MixtureKitError, ValueError):
    """The benchmark cannot run as asked."""


@dataclass
class BenchmarkRow:
    name: str
    role: str  # composition, expert, base, export
    path: str
    scores: dict[str, float] = field(default_factory=dict)  # task -> value of its metric
    metrics: dict[str, str] = field(default_factory=dict)  # task -> metric name


@dataclass
class BenchmarkTable:
    tasks: list[str]
    rows: list[BenchmarkRow]

    def best(self, task: str) -> str | None:
        scored = [r for r in self.rows if task in r.scores]
        if not scored:
            return None
        metric = scored[0].metrics[task]
        pick = min if metric in LOWER_IS_BETTER else max
        return pick(scored, key=lambda r: r.scores[task]).name

    def markdown(self) -> str:
        header = ["model", "role", *[f"{t} ({self.rows[0].metrics.get(t, '?')})" for t in self.tasks]]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        best = {task: self.best(task) for task in self.tasks}
        for row in self.rows:
            cells = []
            for task in self.tasks:
                value = row.scores.get(task)
                text = "—" if value is None else f"{value:.4f}"
                cells.append(f"**{text}**" if value is not None and best[task] == row.name else text)
            lines.append("| " + " | ".join([row.name, row.role, *cells]) + " |")
        return "\n".join(lines) + "\n\nBold: the best per task" + \
            (" (lower is better for perplexities)." if any(r.metrics.get(t) in LOWER_IS_BETTER
                                                             for r in self.rows for t in self.tasks) else ".")

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "rows": [vars(r) for r in self.rows], "markdown": self.markdown(),
                "best": {task: self.best(task) for task in self.tasks}}


def main_metric(task_results: dict[str, Any]) -> tuple[str, float] | None:
    """The metric reported for a task from lm-eval's results (`name,filter` keys), accuracy first."""
    for wanted in METRICS:
        for key, value in task_results.items():
            if key.split(",")[0] == wanted and isinstance(value, (int, float)):
                return wanted, float(value)
    return None


def models_to_benchmark(checkpoint: str | Path, experts: bool = True, base: bool = True) -> list[BenchmarkRow]:
    """The composition, then each expert and the base its stored recipe names (resolved to folders: GGUF converted,
    Hub ids from the cache)."""
    checkpoint = Path(checkpoint)
    require_composed(checkpoint, "benchmark compares a composition with the models it was composed from")
    rows = [BenchmarkRow(checkpoint.name, "composition", str(checkpoint))]
    if not experts and not base:
        return rows
    recipe_path = checkpoint / RECIPE_FILE
    if not recipe_path.is_file():
        raise RecipeError(f"'{checkpoint}' holds no {RECIPE_FILE} (compose writes one; a trained checkpoint has none): "
                          "pass --no-experts to score the composition alone")
    recipe = load_recipe(recipe_path)
    seen = set()
    for role, specs in (("expert", recipe.expert_sources if experts else []),
                        ("hub" if recipe.method == "bts" else "base", [recipe.base] if base and recipe.base else [])):
        for spec in specs:
            folder = str(resolve_source(spec).folder)
            if folder not in seen:
                seen.add(folder)
                rows.append(BenchmarkRow(spec.name, role, folder))
    return rows


def _evaluate(path: str, tasks: list[str], *, include_path: str | None, limit: float | None, device: str,
              dtype: str, batch_size: int, num_fewshot: int | None) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": path, "trust_remote_code": True, "dtype": dtype}, tasks=tasks,
        task_manager=manager, limit=limit, device=device, batch_size=batch_size, num_fewshot=num_fewshot,
        log_samples=False, verbosity="ERROR")
    return results["results"]


def benchmark(
    checkpoint: str | Path, tasks: list[str], *, include_path: str | Path | None = None, limit: float | None = None,
    experts: bool = True, base: bool = True, export: bool = False, device: str | None = None,
    dtype: str | None = None, batch_size: int = 1, num_fewshot: int | None = None, progress: bool = True,
) -> BenchmarkTable:
    """Score the composition (and its experts, base and, with `export`, its native export) on `tasks`."""
    if not tasks:
        raise BenchmarkError("give at least one lm-evaluation-harness task (--tasks NAME[,NAME...])")
    rows = models_to_benchmark(checkpoint, experts, base)
    device = str(resolve_device(device))
    if dtype is None:
        chosen = default_dtype(device, stored_dtype(checkpoint))
        dtype = chosen if isinstance(chosen, str) else str(chosen).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as scratch:
        if export:
            from .export import export as export_native

            native = export_native(checkpoint, "auto", Path(scratch) / "export")
            rows.append(BenchmarkRow(f"{Path(checkpoint).name} (native export)", "export", str(native)))
        for row in tqdm(rows, desc="models", disable=not progress):
            results = _evaluate(row.path, tasks, include_path=str(include_path) if include_path else None,
                                limit=limit, device=device, dtype=dtype, batch_size=batch_size,
                                num_fewshot=num_fewshot)
            for task in tasks:
                found = main_metric(results.get(task, {}))
                if found is None:
                    raise BenchmarkError(f"task '{task}' reported no metric for {row.name} (lm-eval gave "
                                         f"{sorted(results.get(task, {}))})")
                row.metrics[task], row.scores[task] = found
    return BenchmarkTable(list(tasks), rows)


def write_benchmark(table: BenchmarkTable, markdown: str | Path | None, json_path: str | Path | None) -> None:
    if markdown:
        Path(markdown).write_text(table.markdown() + "\n", encoding="utf-8")
    if json_path:
        Path(json_path).write_text(json.dumps(table.to_json(), indent=2) + "\n", encoding="utf-8")
