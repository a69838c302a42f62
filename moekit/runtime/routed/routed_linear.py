"""`btx`: one Linear of a block becomes a routed linear with its own router and one weight per expert."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..base_model.architecture import linear_shape
from ..compute.experts import (
    chosen_experts_output, combine, dispatch, few_tokens_at_inference, gather_slots, grouped_linear,
)
from .routing import Router, RouterLogitsRecorder, route
from .shared_expert import SharedExpertGate, with_shared_expert
from .stacking import StackSource


class RoutedLinear(nn.Module):
    """`weight [E, out, in]`, `bias [E, out]` and a `router`; each token mixes its top-k experts' outputs.

    With `shared_expert`, the dense Linear itself stays as `shared_expert`, always on, optionally weighted by a sigmoid
    `shared_expert_gate`: the output is then ``½ · routed + s(x) · shared`` (see `shared_expert`)."""

    def __init__(self, dense: nn.Module, num_experts: int, top_k: int, recorder: RouterLogitsRecorder | None = None,
                 shared_expert: bool = False, shared_expert_gate: bool = False):
        super().__init__()
        out_features, in_features = linear_shape(dense)
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features)) if dense.bias is not None else None
        self.router = Router(in_features, num_experts, recorder)
        conv1d = isinstance(dense, Conv1D)
        self.source_map: dict[str, StackSource] = {"weight": StackSource(("weight",), transpose=conv1d)}
        if self.bias is not None:
            self.source_map["bias"] = StackSource(("bias",))
        self.shared_expert = dense if shared_expert else None
        self.shared_expert_gate = SharedExpertGate(in_features) if shared_expert and shared_expert_gate else None

    backend = "auto"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        shape = inputs.shape
        tokens = inputs.reshape(-1, shape[-1])
        weights, indices = route(self.router(tokens), self.top_k, self.router.selection_bias)
        if few_tokens_at_inference(tokens.shape[0], self.top_k, self.num_experts, self.weight, self.bias):
            mixed = chosen_experts_output(tokens, self.weight, self.bias, indices, weights)
        else:
            plan = dispatch(indices, weights, self.num_experts)
            mixed = combine(grouped_linear(gather_slots(tokens, plan), self.weight, plan.groups, self.bias,
                                           self.backend), plan)
        mixed = mixed.reshape(*shape[:-1], self.out_features)
        if self.shared_expert is None:
            return mixed
        return with_shared_expert(mixed, inputs, self.shared_expert, self.shared_expert_gate)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, bias={self.bias is not None}, "
                f"shared_expert={self.shared_expert is not None}")
