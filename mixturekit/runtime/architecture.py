"""Where a `transformers` causal LM keeps its blocks and FFNs: the one short table MixtureKit needs per family.

Everything else is found on the model `transformers` builds from the config: the decoder blocks are the
`nn.ModuleList` with one entry per hidden layer, each block's FFN is its `mlp` child, and the FFN's projections are
named by one of the layouts below.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedArchitectureError

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class MlpLayout:
    """How one family names its FFN.

    `gated`: ``down(act(gate(x)) * up(x))``; `dense`: ``down(act(up(x)))``. `up` lists the source projections whose
    outputs are concatenated into the first stacked projection (gate first, as in the transformers v5 experts layout).
    `conv1d`: GPT-2 style `Conv1D` layers, whose weights are stored `[in, out]` and are transposed when stacked.
    """

    kind: str
    up: tuple[str, ...]
    down: str
    activation: str
    conv1d: bool = False
    families: str = ""


MLP_LAYOUTS: tuple[MlpLayout, ...] = (
    MlpLayout("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn",
              families="Llama, Mistral, Qwen2/3, Gemma 1/2/3, OLMo-2, Granite, StableLM"),
    MlpLayout("gated", ("gate_up_proj",), "down_proj", "activation_fn", families="Phi-3"),
    MlpLayout("dense", ("fc1",), "fc2", "activation_fn", families="Phi (phi-2)"),
    MlpLayout("dense", ("dense_h_to_4h",), "dense_4h_to_h", "act", families="GPT-NeoX"),
    MlpLayout("dense", ("c_fc",), "c_proj", "act", conv1d=True, families="GPT-2"),
)


def num_layers(config: PretrainedConfig) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise UnsupportedArchitectureError(f"{config.model_type}: the config gives no number of layers")


def decoder_layers(model: nn.Module, config: PretrainedConfig) -> tuple[str, nn.ModuleList]:
    """The qualified name and the list of the model's decoder blocks."""
    count = num_layers(config)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and all(hasattr(b, "mlp") for b in module):
            return name, module
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} ({config.model_type}): found no list of {count} decoder blocks with an `mlp` "
        "child; MixtureKit supports decoder-only models whose blocks have an `mlp` FFN"
    )


def supported_families() -> str:
    return "; ".join(f"{layout.families}" for layout in MLP_LAYOUTS)


def mlp_layout(mlp: nn.Module, model_type: str) -> MlpLayout:
    """Match a block's FFN against the known layouts, and refuse anything with parameters we would drop."""
    children = dict(mlp.named_children())
    for layout in MLP_LAYOUTS:
        projections = (*layout.up, layout.down)
        if not all(isinstance(children.get(name), LINEAR_TYPES) for name in projections):
            continue
        if not isinstance(getattr(mlp, layout.activation, None), nn.Module):
            continue
        if layout.conv1d != isinstance(children[layout.down], Conv1D):
            continue
        other_parameters = [
            name for name, _ in mlp.named_parameters() if name.split(".")[0] not in projections
        ]
        if other_parameters:
            continue
        return layout
    raise UnsupportedArchitectureError(
        f"'{model_type}' has an FFN ({type(mlp).__name__} with children {sorted(children)}) that matches none of "
        f"the layouts MixtureKit routes. Supported families: {supported_families()}."
    )


def linear_names(block: nn.Module) -> list[str]:
    """Names, relative to a decoder block, of its Linear (and GPT-2 Conv1D) layers: what `btx` can route."""
    return [name for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def resolve_names(requested: list[str], valid: list[str], refuse) -> list[str]:
    """Full block-relative names for `requested` entries: a full name (`mlp.up_proj`) or a unique suffix
    (`up_proj`), without repeats. `refuse(entry, candidates)` builds the caller's error for an unknown or ambiguous
    entry (candidates: the names it could mean, none when unknown)."""
    resolved = []
    for entry in requested:
        candidates = [entry] if entry in valid else [name for name in valid if name.endswith("." + entry)]
        if len(candidates) != 1:
            raise refuse(entry, candidates)
        if candidates[0] not in resolved:
            resolved.append(candidates[0])
    return resolved
