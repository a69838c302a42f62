"""Is this composition better than merging? Its perplexity beside its experts', its base's and the merges' of the same
experts (linear, and TIES where there is a base), all scored on the same tokens.

Merging is the cheap alternative to composing: one dense model of the experts' size, no router to train. A
composition earns its extra parameters only if it beats the merges; this puts the numbers side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .compose import compose
from .errors import MixtureKitError, RecipeError
from .evaluation import data_blocks, perplexity
from .loading import load_for_scoring, load_tokenizer
from .merging import merge_experts, model_sources
from .recipe import ModelSource, Recipe, load_recipe
from .runtime.assembly.config import require_composed
from .sources import check_output_folder, resolve_source
from .data import check_data_source

RECIPE_FILE = "mixturekit_recipe.yaml"  # what compose writes beside the weights


def compare_to_merging(
    target: str | Path,
    data: dict[str, str | Path],
    workdir: str | Path,
    recipe: Recipe | dict | str | Path | None = None,
    base: str | Path | ModelSource | None = None,
    density: float = 0.2,
    block_size: int = 256,
    max_blocks: int = 64,
    batch_size: int = 8,
    text_column: str = "text",
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Perplexity per dataset of `data` (and `mixed`, over all their tokens) of each expert, the base, the linear and
    TIES merges of the experts (written into `workdir`) and the composition.

    `target`: a composed checkpoint folder (its recipe is the one compose stored, or `recipe`), or a recipe, composed
    into `workdir/composed`. `base` (default the recipe's) makes the TIES merge; without one there is none. Returns
    `{"data": {name: {"source", "tokens"}}, "models": [{"name", "kind", "path", "perplexity": {...}}]}`. Models are scored
    one at a time on `device` in `dtype`, as `moekit.load` loads (default a GPU when there is one)."""
    if not data:
        raise MixtureKitError("give at least one evaluation dataset (NAME=FILE, or a dataset name)")
    for source in data.values():  # before anything is merged: a misspelled file fails at once
        check_data_source(source)
    composed, recipe = _composition_and_recipe(Path(target).expanduser(), recipe)
    base = base if base is not None else recipe.base
    workdir = Path(workdir).expanduser().absolute()
    outputs = {"linear": workdir / "linear", **({"ties": workdir / "ties"} if base is not None else {}),
               **({"composed": workdir / "composed"} if composed is None else {})}
    for output in outputs.values():  # refuse an existing output before writing any
        check_output_folder(output, overwrite)
    tokenizer_folder = composed if composed is not None else resolve_source(recipe.expert_sources[0]).folder
    tokenizer = load_tokenizer(tokenizer_folder, "the evaluation data is tokenized with the composition's tokenizer")
    blocks = {name: data_blocks(source, tokenizer, block_size, max_blocks, text_column)
              for name, source in data.items()}

    dtype = None if recipe.dtype == "auto" else recipe.dtype  # the merges in the composition's dtype
    ties = None  # first: it checks the base too, so a refusal comes before anything is written
    if base is not None:
        ties = merge_experts(recipe.experts, outputs["ties"], "ties", base=base, density=density, dtype=dtype,
                             overwrite=overwrite, progress=progress)
    linear = merge_experts(recipe.experts, outputs["linear"], "linear", dtype=dtype, overwrite=overwrite,
                           progress=progress)
    merged = {"linear merge": linear, **({f"TIES merge (density {density:g})": ties} if ties is not None else {})}
    if composed is None:
        composed = compose(recipe, outputs["composed"], overwrite=overwrite, progress=progress)

    rows = [(f"expert {spec.name}", "expert", _loadable(spec)) for spec in recipe.experts]
    if base is not None:
        spec = model_sources([base])[0]
        rows.append((f"base {spec.name}", "base", _loadable(spec)))
    rows += [(name, "merge", path) for name, path in merged.items()]
    rows.append((f"composition ({recipe.method})", "composition", composed))
    models = [{"name": name, "kind": kind, "path": str(path),
               "perplexity": _perplexity(path, blocks, batch_size, device, dtype)}
              for name, kind, path in tqdm(rows, desc="scoring", unit="model", disable=not progress)]
    return {"data": {name: {"source": str(data[name]), "tokens": int(blocks[name][:, 1:].numel())} for name in data},
            "models": models}


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (perplexity, lower is better) and one line that answers the question."""
    columns = [*result["data"], "mixed"]
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    lines += ["| " + model["name"] + " | " + " | ".join(f"{model['perplexity'][c]:.3f}" for c in columns) + " |"
              for model in result["models"]]
    composition = next(m for m in result["models"] if m["kind"] == "composition")
    best = min((m for m in result["models"] if m["kind"] == "merge"), key=lambda m: m["perplexity"]["mixed"])
    ours, theirs = composition["perplexity"]["mixed"], best["perplexity"]["mixed"]
    verdict = "composing is better" if ours < theirs else "merging is as good or better"
    lines += ["", f"Perplexity, lower is better; mixed is over all the datasets' tokens. Mixed: {composition['name']} "
                  f"{ours:.3f} against the best merge, {best['name']}, {theirs:.3f}: {verdict} "
                  f"({(ours / theirs - 1) * 100:+.1f}%)."]
    return "\n".join(lines)


def _composition_and_recipe(target: Path, recipe) -> tuple[Path | None, Recipe]:
    """A composed folder and its recipe (given, or the one compose stored in it); or no folder yet and the recipe
    `target` is."""
    if not target.is_dir():
        if recipe is not None:
            raise RecipeError(f"'{target}' is a recipe, and a second one was given: give the recipe once, or a "
                              "composed checkpoint folder with the recipe it was composed from")
        return None, load_recipe(target)
    require_composed(target, "compare scores a composition against merges of its experts")
    if recipe is None:
        stored = target / RECIPE_FILE
        if not stored.is_file():
            raise RecipeError(f"'{target}' holds no {RECIPE_FILE} (compose writes one; a trained checkpoint has "
                              "none): give the recipe it was composed from (--recipe)")
        recipe = stored
    return target, load_recipe(recipe)


def _loadable(spec: ModelSource) -> Path:
    """Where `from_pretrained` finds the model: its resolved folder (a .gguf converted, a Hub id from the cache),
    or a LoRA adapter's own folder (transformers loads it over its base)."""
    model = resolve_source(spec)
    return Path(spec.source).expanduser() if model.origin.startswith("lora:") else model.folder


def _perplexity(path: Path, blocks: dict, batch_size: int, device, dtype) -> dict[str, float]:
    model = load_for_scoring(path, device=device, dtype=dtype)  # as `evaluate` loads
    scores = perplexity(model, blocks, batch_size)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next model scored gets the memory back
    return scores
