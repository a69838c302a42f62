"""Checkpoint tensors as `transformers` loads them: names and layouts converted with transformers' own rules.

`transformers` keeps per-model-type rules (`transformers.conversion_mapping`) that it applies on load and reverts on
save, so checkpoints, even those it writes itself, keep a stored layout that differs from the model's: renamings
(GPT-NeoX's `embed_out` -> `lm_head`, EXAONE's `transformer.h.*` -> `model.layers.*`) and converters that compute the
model's tensors from stored ones (LaraMini's fused `linear_attn.in_proj` split in four; MoE experts stored one Linear
each, stacked). We apply the same rules, with transformers' own rule and operation objects: names and shapes when a
checkpoint is planned (the shapes by running each converter on `meta` tensors, reading data only when a converter
cannot run without it), and each converted tensor's data when it is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from ..errors import CompatibilityError, SourceError


@dataclass(frozen=True, eq=False)
class Conversion:
    """A group of stored tensors that one of transformers' `WeightConverter` rules turns into model tensors."""

    rule: object  # transformers' WeightConverter, as the mapping gives it; each run converts with a fresh copy of it
    layer_name: str  # the group's first model tensor: the name transformers converts it under
    sources: tuple[tuple[str, str], ...]  # (the rule's source pattern, stored name), in transformers' order
    model: nn.Module  # the (meta) model the rule may read target shapes from (e.g. `Split`)

    def run(self, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model tensors of this group, from the stored tensors `read(stored_name)` gives (called lazily by the
        rule, as transformers' synchronous loading does)."""
        rule = copy.deepcopy(self.rule)  # running a rule consumes the tensors collected into it
        for pattern, stored in self.sources:
            rule.add_tensor(self.layer_name, stored, pattern, partial(read, stored))
        with torch.no_grad():
            outputs = rule.convert(self.layer_name, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in outputs.items()}

    def describe(self) -> str:
        operations = ", ".join(repr(op) for op in getattr(self.rule, "operations", ()))
        return f"{self.rule.source_patterns} -> {self.rule.target_patterns} by {operations}"


@dataclass(frozen=True)
class ConvertedTensor:
    """A model tensor computed from stored ones by a `Conversion`: its name, dtype and shape are known before its
    data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    conversion: Conversion


def checkpoint_names(
    model: nn.Module, stored: dict[str, object], read: Callable[[str], torch.Tensor],
) -> dict[str, tuple[str, ConvertedTensor | None]]:
    """How `model` names the tensors of a checkpoint whose stored tensors are `stored` (name -> an object with `dtype`
    and `shape`): model name -> (stored name, None) for a tensor read as stored, or (its group's first stored name, a
    `ConvertedTensor`) for one a converter computes. `read(stored_name)` gives a stored tensor's data, asked for only
    when a converter cannot tell its output shapes from `meta` tensors. A checkpoint already in the model's layout
    matches no rule and keeps its names."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: rule for rule in converters for pattern in rule.source_patterns}
    expected = model.state_dict()  # meta: names and shapes only
    prefix = getattr(model, "base_model_prefix", None) or None
    names: dict[str, tuple[str, ConvertedTensor | None]] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(stored, key=dot_natural_key):  # transformers' order: the order a rule stacks experts in
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as transformers: the stored name was already the model's
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        if pattern is not None and renamed in expected:
            groups.setdefault(renamed, []).append((pattern, key))
        elif pattern is not None:  # a rule's group the model has no tensor for: transformers drops it, we ignore it
            _add(names, key, key, None)
        else:
            _add(names, renamed, key, None)
    for layer_name, sources in groups.items():
        rule = by_pattern[sources[0][0]]
        conversion = Conversion(rule, layer_name, tuple(sources), model)
        for name, (dtype, shape) in _output_layouts(conversion, stored, read).items():
            _add(names, name, sources[0][1], ConvertedTensor(name, dtype, shape, conversion))
    return names


def _add(names: dict, name: str, stored: str, converted: ConvertedTensor | None) -> None:
    if name in names:
        raise SourceError(f"stored tensors '{names[name][0]}' and '{stored}' both load as '{name}'")
    names[name] = (stored, converted)


def _output_layouts(conversion: Conversion, stored: dict[str, object],
                    read: Callable[[str], torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Each output's dtype and shape: from the rule run on `meta` tensors, else (a rule that needs the data) on the
    stored tensors themselves. A rule that fails on those is refused, naming it."""
    def empty(name: str) -> torch.Tensor:
        return torch.empty(stored[name].shape, dtype=stored[name].dtype, device="meta")

    try:
        outputs = conversion.run(empty)
    except Exception:  # noqa: BLE001  (an operation that looks at values: run it on the data)
        try:
            outputs = conversion.run(read)
        except Exception as error:  # noqa: BLE001
            model_type = getattr(conversion.model.config, "model_type", type(conversion.model).__name__)
            raise CompatibilityError(
                f"'{model_type}' checkpoints store '{conversion.sources[0][1]}' in a layout that transformers "
                f"converts on load ({conversion.describe()}), and that conversion fails on it "
                f"({type(error).__name__}: {error}); check that transformers' from_pretrained loads it"
            ) from None
    return {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in outputs.items()}
