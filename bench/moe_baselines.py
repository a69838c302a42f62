"""The blocks the layer benchmark times, built at one FFN shape: ours (traditional, btx), transformers' own Mixtral
block, a dense FFN, and the per-expert mask loop of the original MixtureKit, written here as a baseline.

Every block maps `[tokens, d] -> [tokens, d]`. `experts_given_routing` runs a block's expert computation with a
routing chosen outside it, so implementations whose routers round differently (transformers computes router logits
in bf16, we in float32) are still compared on the same assignment before anything is timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from moekit.runtime.base_model.ffn_layout import MlpLayout
from moekit.runtime.compute.experts import combine, dispatch
from moekit.runtime.routed.moe_block import SparseMoeBlock
from moekit.runtime.routed.routed_linear import RoutedLinear
from moekit.runtime.routed.routing import route

GATED_LAYOUT = MlpLayout("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn")  # Llama's FFN


def dense_ffn(d: int, f: int) -> LlamaMLP:
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu"))


def traditional_block(d: int, f: int, experts: int, top_k: int) -> SparseMoeBlock:
    block = SparseMoeBlock(dense_ffn(d, f), GATED_LAYOUT, experts, top_k)
    nn.init.normal_(block.gate.weight, std=d ** -0.5)  # decisive routing, as a trained router has
    return block


def btx_block(d: int, f: int, experts: int, top_k: int) -> LlamaMLP:
    """A gated FFN whose gate, up and down projections are each a routed linear with its own router."""
    block = dense_ffn(d, f)
    for name in ("gate_proj", "up_proj", "down_proj"):
        routed = RoutedLinear(getattr(block, name), experts, top_k)
        nn.init.normal_(routed.router.weight, std=routed.in_features ** -0.5)
        setattr(block, name, routed)
    return block


class MaskLoopMoe(nn.Module):
    """The original MixtureKit's style: separate `nn.Linear`s per expert and a Python loop that finds each expert's
    tokens with a boolean mask (`torch.where`), runs them, and scatters the weighted result back."""

    def __init__(self, d: int, f: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(dense_ffn(d, f) for _ in range(experts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights, indices = route(F.linear(tokens.float(), self.gate.weight.float()), self.top_k)
        return self.experts_given_routing(tokens, indices, weights)

    def experts_given_routing(self, tokens, indices, weights) -> torch.Tensor:
        output = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_index, slot = torch.where(indices == e)
            if token_index.numel() == 0:
                continue
            contribution = expert(tokens[token_index]) * weights[token_index, slot, None].to(tokens.dtype)
            output.index_add_(0, token_index, contribution)
        return output


def hf_mixtral_block(d: int, f: int, experts: int, top_k: int, implementation: str = "grouped_mm") -> nn.Module:
    """transformers' own `MixtralSparseMoeBlock` with the named experts implementation (v5 experts interface)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=experts, num_experts_per_tok=top_k,
                           hidden_act="silu")
    config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config)


@torch.no_grad()
def copy_traditional_into(ours: SparseMoeBlock, other: nn.Module) -> None:
    """Give the mask-loop or the Mixtral block the same router and expert weights as our block."""
    other.gate.weight.copy_(ours.gate.weight)
    gate_up, down = ours.experts.gate_up_proj, ours.experts.down_proj
    if isinstance(other, MaskLoopMoe):
        f = down.shape[-1]
        for e, expert in enumerate(other.experts):
            expert.gate_proj.weight.copy_(gate_up[e, :f])
            expert.up_proj.weight.copy_(gate_up[e, f:])
            expert.down_proj.weight.copy_(down[e])
    else:
        other.experts.gate_up_proj.copy_(gate_up)
        other.experts.down_proj.copy_(down)


def experts_given_routing(block: nn.Module, tokens: torch.Tensor, indices: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """The block's expert computation on a routing chosen outside it."""
    if isinstance(block, SparseMoeBlock):
        plan = dispatch(indices, weights, block.num_experts)
        return combine(block.experts.forward_groups(tokens[plan.token_index], plan.groups), plan)
    if isinstance(block, MaskLoopMoe):
        return block.experts_given_routing(tokens, indices, weights)
    return block.experts(tokens, indices, weights.to(tokens.dtype))  # transformers' experts module


def routing_of(block: SparseMoeBlock, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return route(block.gate(tokens), block.top_k)
