"""Swap routed modules into a freshly built dense model: `traditional` replaces chosen blocks' FFNs by sparse MoE
blocks, `btx` chosen Linears by routed Linears; which blocks and Linears, resolved from the recipe's names."""

from __future__ import annotations

from torch import nn

from ...errors import RecipeError
from ..base_model.architecture import (
    LINEAR_TYPES, decoder_layers, ffn_child, ffn_linear_names, is_mixture_of_experts, linear_names,
    parallel_layer_lists, resolve_names,
)
from ..base_model.ffn_layout import mlp_layout
from .config import MixtureKitConfig
from ..routed.moe_block import SparseMoeBlock
from ..routed.routed_linear import RoutedLinear
from ..routed.routing import RouterLogitsRecorder

ROUTED_MODULE_TYPES = (SparseMoeBlock, RoutedLinear)


def resolve_layer_indices(requested: list[int] | None, num_blocks: int) -> list[int]:
    """The blocks that get routers: all when `requested` is empty or None."""
    if not requested:
        return list(range(num_blocks))
    out_of_range = [i for i in requested if not 0 <= i < num_blocks]
    if out_of_range:
        raise RecipeError(f"router_layers_index {out_of_range} out of range: the model has blocks 0..{num_blocks - 1}")
    return sorted(requested)


def resolve_router_layers(requested: list[str] | None, block: nn.Module, model_type: str,
                          parallel: list[tuple[str, nn.ModuleList]] | None = None) -> list[str]:
    """Map `router_layers` entries (full `mlp.up_proj` or a unique suffix like `up_proj`) onto the block's Linears.
    `parallel`: the model's `parallel_layer_lists`, for the default (`ffn_linear_names`)."""
    valid = linear_names(block)
    if requested is None:
        default = ffn_linear_names(block, model_type, parallel)
        child = ffn_child(block)
        if not default and child is not None and is_mixture_of_experts(getattr(block, child)):
            attention = [name for name in valid if not name.startswith(child + ".")]
            raise RecipeError(f"'{model_type}' has no dense FFN module whose Linears btx routes by default (an MoE, "
                              "a recurrent block, or Linears outside any FFN module); its FFN is already a "
                              f"Mixture-of-Experts ({type(getattr(block, child)).__name__}): name the Linears beside "
                              f"it in router_layers (here: {', '.join(attention)}) and its experts are averaged")
        if not default:
            raise RecipeError(f"'{model_type}' has no dense FFN module whose Linears btx routes by default (an MoE, "
                              "a recurrent block, or Linears outside any FFN module); name them in router_layers "
                              f"(valid names: {', '.join(valid)})")
        return default

    child = ffn_child(block)
    moe = getattr(block, child) if child is not None and is_mixture_of_experts(getattr(block, child)) else None

    def refuse(entry: str, candidates: list[str]) -> RecipeError:
        if moe is not None and not candidates:  # a family whose first blocks are dense and later ones MoE
            return RecipeError(
                f"router_layers entry '{entry}' is not a Linear of a block of '{model_type}' whose FFN is already a "
                f"Mixture-of-Experts ({type(moe).__name__}), and btx routes dense FFNs' Linears; set "
                f"router_layers_index to the dense blocks, or name Linears every routed block has "
                f"(valid names here: {', '.join(valid)})")
        why = "is ambiguous" if candidates else "is not a Linear of the block"
        return RecipeError(f"router_layers entry '{entry}' {why} in '{model_type}'; valid names: {', '.join(valid)}")

    return resolve_names(requested, valid, refuse)


def blocks_holding(requested: list[str] | None, blocks: list[nn.Module], model_type: str) -> list[int] | None:
    """The blocks btx routes when the recipe names Linears but no router_layers_index: those that hold every named
    Linear, when some blocks hold none (a hybrid's linear-attention or Mamba blocks beside its attention blocks, when
    attention projections are named); None when every block holds them, or none does (resolving then says why)."""
    if not requested:
        return None

    def holds(block: nn.Module, entry: str) -> bool:
        valid = linear_names(block)
        return entry in valid or sum(name.endswith("." + entry) for name in valid) == 1

    held = [[holds(block, entry) for entry in requested] for block in blocks]
    partial = [index for index, marks in enumerate(held) if any(marks) and not all(marks)]
    if partial:
        index = partial[0]
        missing = [entry for entry, mark in zip(requested, held[index]) if not mark]
        raise RecipeError(
            f"router_layers names Linears that block {index} of '{model_type}' holds only in part (it has no "
            f"{', '.join(missing)}); name Linears that each block holds all of or none of, or set "
            f"router_layers_index (valid names in block {index}: {', '.join(linear_names(blocks[index]))})")
    holding = [index for index, marks in enumerate(held) if all(marks)]
    return holding if holding and len(holding) < len(blocks) else None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def convert_dense_to_moe(dense: nn.Module, config: MixtureKitConfig, recorder: RouterLogitsRecorder) -> None:
    """Swap routed modules into a freshly built dense model, in place."""
    text_config = config.text_config
    layers_name, layers = decoder_layers(dense, text_config)
    indices = resolve_layer_indices(config.router_layers_index, len(layers))
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    if not 1 <= top_k <= num_experts:
        raise RecipeError(f"num_experts_per_tok must be between 1 and {num_experts}, got {top_k}")
    if config.shared_expert not in (None, "base"):
        raise RecipeError(f"shared_expert must be 'base' or absent, got {config.shared_expert!r}")
    shared = dict(shared_expert=config.shared_expert is not None,
                  shared_expert_gate=config.shared_expert is not None and config.shared_expert_gate)
    if config.method == "traditional":
        for index in indices:
            layout = mlp_layout(layers[index], text_config.model_type)
            ffn = getattr(layers[index], layout.child)
            setattr(layers[index], layout.child, SparseMoeBlock(ffn, layout, num_experts, top_k, recorder, **shared))
    elif config.method == "btx":
        parallel = parallel_layer_lists(dense, text_config, layers_name) if config.router_layers is None else None
        for index in indices:
            block = layers[index]
            for name in resolve_router_layers(config.router_layers, block, text_config.model_type, parallel):
                linear = block.get_submodule(name)
                if not isinstance(linear, LINEAR_TYPES):
                    raise RecipeError(f"router_layers entry '{name}' is a {type(linear).__name__}, not a Linear")
                _set_submodule(block, name, RoutedLinear(linear, num_experts, top_k, recorder, **shared))
    else:
        raise RecipeError(f"method '{config.method}' is not routed; valid: traditional, btx (bts builds streams)")
