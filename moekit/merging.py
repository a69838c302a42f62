"""Merge dense checkpoints of one architecture into one dense checkpoint: the baselines a composition should beat.

`linear` is the weighted mean of the experts' weights (a model soup). `ties` is TIES-Merging (Yadav et al., 2023)
as mergekit implements it: each expert's task vector τ_i = θ_i − θ_base keeps the `density` fraction of its entries
largest in magnitude (per tensor), each element's sign is elected as the sign of Σ_i w_i·τ_i (a sum of exactly 0
elects +), and the kept entries that agree with it are averaged with weights w_i (0 where none agrees); the result is
θ_base + τ (λ = 1).

A merge streams as the composer does, and reuses its pieces: the sources are resolved and checked as a
composition's are (one architecture and config, one tokenizer, every tensor with the same shape), then each output
tensor is read from the sources, merged in float32 and written into size-bounded shards of a staging folder that is
swapped into place at the end. Peak memory is about one tensor per source.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .compose import average_in_blocks
from .errors import MergeError, did_you_mean
from .plan import DTYPES, check_compatible, check_dense_tensors, source_dtype
from .recipe import ModelSource, Recipe, parse_size
from .sources import (
    LocalModel, TensorSlot, check_output_folder, copy_tokenizer_files, resolve_source, staged_output, write_sharded,
)

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("linear", "ties")
SHARD_BYTES = parse_size(Recipe.model_fields["shard_size"].default)  # a composition's default shard size


def merge_experts(
    experts: Sequence[str | Path | ModelSource],
    output: str | Path,
    method: str = "linear",
    base: str | Path | ModelSource | None = None,
    density: float = 0.2,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge dense checkpoints of one architecture (folders, .gguf files, Hub ids, LoRA adapters: what a recipe's
    `source` takes) into one dense checkpoint at `output` that `AutoModelForCausalLM` loads; return its path.

    `base` (ties only): the model the experts were fine-tuned from. `density` (ties): the fraction of each task
    vector kept. `weights`: one positive weight per expert (default equal). `dtype`: of the written tensors; default
    (or "auto") the first expert's. Nothing is written when a check fails, and an existing `output` is replaced only
    with `overwrite`."""
    weights = _checked_settings(len(experts), method, base, density, weights)
    target = Path(output).expanduser().absolute()
    check_output_folder(target, overwrite)
    specs = model_sources([*experts, *([base] if base is not None else [])])
    models = [resolve_source(spec) for spec in specs]
    for note in check_compatible(models, reference=0):
        logger.warning(note)
    expert_models, base_model = models[:len(experts)], (models[-1] if base is not None else None)
    out_dtype = _output_dtype(dtype, expert_models[0])
    config = copy.deepcopy(expert_models[0].config)
    config.dtype = str(out_dtype).removeprefix("torch.")
    _, expected = check_dense_tensors(models, config)
    copied_from = base_model or expert_models[0]  # integer tensors (buffers) are copied, not merged
    slots = []
    for name, shape in expected.items():
        stored = copied_from.reader.info(name).dtype
        slots.append(TensorSlot(name, out_dtype if stored.is_floating_point else stored, shape))

    def parts_of(slot: TensorSlot) -> Iterator[torch.Tensor]:
        if not slot.dtype.is_floating_point:
            return iter([copied_from.reader.get(slot.name)])
        return _merged(slot, expert_models, base_model, method, weights, density)

    with staged_output(target, f"{method} merge", sum(slot.nbytes for slot in slots)) as staging:
        write_sharded(staging, slots, parts_of, SHARD_BYTES, progress, desc=f"merging ({method})")
        config.save_pretrained(staging)
        copy_tokenizer_files(expert_models[0].folder, staging)
        (staging / "README.md").write_text(
            _model_card(expert_models, base_model, method, weights, density, config.model_type), encoding="utf-8")
    return target


def _merged(slot: TensorSlot, experts: list[LocalModel], base: LocalModel | None, method: str,
            weights: list[float], density: float) -> Iterator[torch.Tensor]:
    """One floating-point output tensor, as parts for the shard writer."""
    readers = [model.reader for model in experts]
    if method == "linear" and len(set(weights)) == 1:  # the plain mean: the composer's block average, bit for bit
        stored = [reader.stored(slot.name) for reader in readers]
        if all(info is not None and info.dtype.is_floating_point for info in stored):
            yield from average_in_blocks(stored, slot.dtype)
            return
    tensors = (reader.get(slot.name) for reader in readers)  # read one by one as the merge asks for them
    if method == "linear":
        yield linear_merge(tensors, weights).to(slot.dtype)
    else:
        yield ties_merge(base.reader.get(slot.name), tensors, weights, density).to(slot.dtype)


def linear_merge(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i·x_i / Σ_i w_i in float32, holding the running sum and one tensor at a time."""
    total = None
    for tensor, weight in zip(tensors, weights):
        term = tensor.to(torch.float32) * weight
        total = term if total is None else total.add_(term)
    return total.div_(sum(weights))


def ties_merge(base: torch.Tensor, experts: Iterable[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES-Merging of one tensor in float32 (trim, elect sign, disjoint mean; λ = 1), as mergekit's `ties`."""
    base = base.to(torch.float32)
    deltas = [trim(expert.to(torch.float32) - base, density) for expert in experts]
    positive = sum(weight * delta for weight, delta in zip(weights, deltas)) >= 0  # the elected sign: + on a tie
    merged, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for weight, delta in zip(weights, deltas):
        agrees = torch.where(positive, delta > 0, delta < 0)  # a trimmed (zero) entry agrees with neither sign
        merged += torch.where(agrees, delta * weight, 0.0)
        divisor += agrees * weight
    divisor[divisor == 0] = 1  # no entry agrees: the merged entry stays 0
    return base + merged.div_(divisor)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with only its `int(density · numel)` entries largest in magnitude kept, the rest zero (mergekit's
    `magnitude` sparsification). At least one entry is kept, where mergekit would stop."""
    if density >= 1 or delta.numel() == 0:
        return delta
    flat = delta.reshape(-1)
    keep = flat.abs().topk(max(1, int(density * flat.numel())), sorted=False).indices
    kept = torch.zeros_like(flat)
    kept[keep] = flat[keep]
    return kept.view_as(delta)


def _checked_settings(count: int, method: str, base, density: float,
                      weights: Sequence[float] | None) -> list[float]:
    """Refuse a bad setting before anything is read or written; return the weights (default all 1)."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method '{method}'{did_you_mean(str(method), list(METHODS))}; valid: "
                         f"{', '.join(METHODS)}")
    if count < 2:
        raise MergeError(f"a merge needs at least 2 experts, got {count}: give two or more dense checkpoints of "
                         "one architecture")
    if method == "ties" and base is None:
        raise MergeError("ties needs a base, the model the experts were fine-tuned from (task vectors are the "
                         "experts' differences from it): give base (--base), or use method linear")
    if method == "linear" and base is not None:
        raise MergeError("linear averages the experts alone and takes no base: leave base out, or use method ties")
    if not (isinstance(density, numbers.Real) and 0 < density <= 1):
        raise MergeError(f"density must be in (0, 1], the fraction of each task vector's entries ties keeps; got "
                         f"{density!r}")
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise MergeError(f"{len(weights)} weights for {count} experts: give one weight per expert, in their order")
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) and w > 0 for w in weights):
        raise MergeError(f"weights must be positive finite numbers, got {weights}")
    return [float(w) for w in weights]


def _output_dtype(dtype: str | torch.dtype | None, reference: LocalModel) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return source_dtype(reference)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    valid = ["auto", *DTYPES]
    raise MergeError(f"unknown dtype {dtype!r}{did_you_mean(str(dtype), valid)}; valid: {', '.join(valid)}")


def model_sources(items: Sequence[str | Path | ModelSource]) -> list[ModelSource]:
    """Each path or id as a `ModelSource` named after its last part (for messages), made unique."""
    sources, names = [], set()
    for index, item in enumerate(items):
        if not isinstance(item, ModelSource):
            text = str(item)
            stem = Path(text.rstrip("/")).name.removesuffix(".gguf")
            name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).lstrip("-_") or f"model{index}"
            item = ModelSource(name=f"{name}-{index}" if name in names else name, source=text)
        names.add(item.name)
        sources.append(item)
    return sources


def _model_card(experts: list[LocalModel], base: LocalModel | None, method: str, weights: list[float],
                density: float, model_type: str) -> str:
    from .distribution import VERSION

    what = (f"The weighted mean of {len(experts)} `{model_type}` models' weights" if method == "linear" else
            f"TIES-Merging of {len(experts)} `{model_type}` models over the base `{base.name}` (density {density}, "
            "sign elected by the weighted sum, disjoint mean, λ = 1)")
    rows = [f"| {m.name} | expert | {w:g} | `{m.origin}` |" for m, w in zip(experts, weights)]
    rows += [f"| {base.name} | base | | `{base.origin}` |"] if base is not None else []
    return (f"---\nlibrary_name: transformers\ntags:\n- moekit\n- merge\n- {method}\n---\n\n"
            f"# A {'TIES' if method == 'ties' else method} merge, by MixtureKit {VERSION}\n\n{what}, in float32. A dense model: it loads with "
            "`AutoModelForCausalLM`, no moekit needed. It is the baseline a composition of the same experts "
            "should beat (`moekit compare`).\n\n| model | role | weight | source |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")
