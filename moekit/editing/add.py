"""Add an expert to a composed checkpoint (traditional, btx): a dense checkpoint of the same base becomes expert E+1.

Its chunk of every stacked tensor is its own FFN (projection) weights, laid out as compose lays out an expert's;
the shared (averaged) weights are kept as they are, so the existing experts compute what they computed. Its router
rows start at zero (`router_init: zeros`), so its logit is 0 everywhere: for every token whose k-th largest existing
logit is above 0 it loses, and that token's routing and output are unchanged. Removing it again gives back the
original checkpoint's logits exactly. Fit its rows from data afterwards (`fit_routers_from_data`) for a useful router.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..recipe import ModelSource
from ..runtime.assembly.config import MixtureKitConfig, require_composed
from ..runtime.base_model.dense_model import dense_model_class
from ..sources.resolve import resolve_source
from ..sources.safetensors_io import CheckpointReader
from .expert_tensors import ExpertRows, expert_tensors, meta_model
from .remove import EditError
from .rewrite import NewExpert, edited_checkpoint

ROUTER_INITS = ("zeros",)


def _source_reader(source: str, name: str, config: MixtureKitConfig) -> CheckpointReader:
    """The new expert's tensors, addressed as its dense model names them; refused when it is not of the base."""
    model = resolve_source(ModelSource(name=name, source=str(source)))
    base = config.text_config
    if model.config.model_type != base.model_type:
        raise EditError(f"expert '{name}' ({source}) is a {model.config.model_type} model, but this composition's base "
                        f"is {base.model_type}: add a fine-tune of the same base model")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        ours, theirs = getattr(config.language_config, field, None), getattr(model.config, field, None)
        if ours != theirs:
            raise EditError(f"expert '{name}' ({source}) has {field} {theirs}, this composition's base has {ours}: "
                            "add a fine-tune of the same base model (same shapes)")
    with torch.device("meta"):
        dense = dense_model_class(model.config)(model.config)
    reader = CheckpointReader(model.weight_files)
    reader.read_as(dense)
    return reader


def add_expert(checkpoint: str | Path, name: str, source: str | Path, output: str | Path,
               router_init: str = "zeros", overwrite: bool = False, progress: bool = False) -> Path:
    """Write `checkpoint` with the dense model `source` appended as expert `name` to `output`."""
    require_composed(checkpoint, "only a composition takes another expert", EditError)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    if config.method == "bts":
        raise EditError("adding an expert stream to a bts composition is not supported (its stitches would need new "
                        "projections); recompose with the new expert in the recipe")
    if name in config.expert_names:
        raise EditError(f"an expert named {name!r} is already in this checkpoint ({', '.join(config.expert_names)}); "
                        "choose another name")
    ModelSource(name=name, source=str(source))  # the name rules of a recipe's experts
    if router_init not in ROUTER_INITS:
        raise EditError(f"router_init for an added expert must be one of {', '.join(ROUTER_INITS)}, got "
                        f"{router_init!r}; fit its rows from data afterwards with fit_routers_from_data")
    reader = _source_reader(str(source), name, config)
    owners = expert_tensors(meta_model(config))

    def tensor_names(kind: ExpertRows) -> list[str]:
        return [f"{kind.module}.{source_name}" if kind.module else source_name for source_name in kind.stack.names]

    missing = [n for kind in owners.values() if isinstance(kind, ExpertRows) and kind.role == "stack"
               for n in tensor_names(kind) if n not in reader]
    if missing:
        raise EditError(f"expert '{name}' ({source}) has no tensor {missing[0]!r} (and {len(missing) - 1} more "
                        "missing), which the composition's experts have: add a fine-tune of the same base model")

    def rows(tensor: str, kind: ExpertRows, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if kind.role == "stack":
            pieces = [reader.get(n) for n in tensor_names(kind)]
            chunk = torch.cat([p.t() if kind.stack.transpose else p for p in pieces])
            if chunk.numel() != torch.Size(shape).numel():
                raise EditError(f"expert '{name}' ({source}) gives {tensor!r} {list(chunk.shape)} values, the "
                                f"composition's experts have {list(shape[1:])}: add a fine-tune of the same base model")
            return chunk.reshape(shape).to(dtype)
        return torch.zeros(shape, dtype=dtype)  # router row, selection bias: zero

    edit = {"operation": "add", "experts": [name], "source": str(source), "router_init": router_init}
    return edited_checkpoint(checkpoint, output, list(range(config.num_experts)), edit,
                             added=NewExpert(name, rows), overwrite=overwrite, progress=progress)
