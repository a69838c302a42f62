"""Which tensors of a composed checkpoint belong to which expert, found from the modules its config builds (on the
meta device, no weight read), never from name patterns.

Two shapes of ownership cover every method:
- a tensor whose rows are per-expert chunks along dim 0 (`ExpertRows`): stacked experts `[E, ...]`, router rows
  `[E, d]` and selection biases `[E]`; a bts merge stitch's gate `[(E + 1) · H, ...]` (the hub's chunk first);
- a whole tensor of one expert (`ExpertOwned`): a bts stream's weights, a stitch's per-stream projection, gate and
  scale, named by the expert's name or index.
Everything else (averaged weights, the hub, shared experts) is no expert's and is kept as it is by every edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.assembly.config import MixtureKitConfig
from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.routed.moe_block import SparseMoeBlock
from ..runtime.routed.routed_linear import RoutedLinear
from ..runtime.routed.routing import Router
from ..runtime.routed.stacking import StackSource
from ..runtime.bts.stitch import MERGE, Stitch


@dataclass(frozen=True)
class ExpertRows:
    """Dim 0 is `leading + E` equal chunks; chunk `leading + i` is expert i's. `module` and `stack` say where a new
    expert's chunk comes from in a dense model (`module.<stack.sources>`); None for routers and stitches."""

    leading: int = 0
    module: str | None = None
    stack: StackSource | None = None
    role: str = "stack"  # stack, router, selection_bias, merge_gate


@dataclass(frozen=True)
class ExpertOwned:
    """The whole tensor is expert `expert`'s; `rename(new_index, new_name)` gives its name after an edit."""

    expert: int
    prefix: str  # the name up to the part that names the expert
    suffix: str  # the name after it
    by_name: bool  # the expert is named by its name (bts streams), else by its index (stitch ModuleLists)

    def renamed(self, index: int, name: str) -> str:
        return f"{self.prefix}{name if self.by_name else index}{self.suffix}"


def meta_model(config: MixtureKitConfig) -> MixtureKitForCausalLM:
    with torch.device("meta"):
        return MixtureKitForCausalLM(config)


def expert_tensors(model: MixtureKitForCausalLM) -> dict[str, ExpertRows | ExpertOwned]:
    """Every tensor name of `model` that belongs to experts, with how."""
    found: dict[str, ExpertRows | ExpertOwned] = {}
    names = list(model.config.expert_names)
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, Router):
            found[f"{prefix}weight"] = ExpertRows(role="router")
            found[f"{prefix}expert_bias"] = ExpertRows(role="selection_bias")
        elif isinstance(module, (SparseMoeBlock, RoutedLinear)):
            for local, stack in module.source_map.items():
                found[f"{prefix}{local}"] = ExpertRows(module=path, stack=stack)
        elif isinstance(module, Stitch):
            _stitch_tensors(module, prefix, found)
    if model.config.method == "bts":
        for index, name in enumerate(names):
            for local, _ in model.streams[name].state_dict().items():
                found[f"streams.{name}.{local}"] = ExpertOwned(index, "streams.", f".{local}", by_name=True)
    return found


def _stitch_tensors(stitch: Stitch, prefix: str, found: dict) -> None:
    if stitch.direction == MERGE:
        found[f"{prefix}gate.weight"] = ExpertRows(leading=1, role="merge_gate")
        found[f"{prefix}gate.bias"] = ExpertRows(leading=1, role="merge_gate")
        lists = ("projections",)
    else:
        lists = ("gates", "projections", "scales")
    for list_name in lists:
        container: nn.Module = getattr(stitch, list_name)
        for local in container.state_dict():
            index, _, rest = local.partition(".")
            found[f"{prefix}{list_name}.{local}"] = ExpertOwned(
                int(index), f"{prefix}{list_name}.", f".{rest}" if rest else "", by_name=False)
