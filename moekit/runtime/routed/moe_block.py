"""`traditional`: a block's whole FFN becomes a sparse MoE block (Mixtral layout, transformers v5 stacked experts)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..base_model.architecture import linear_shape
from ..base_model.ffn_layout import MlpLayout, activation_module, has_parameters
from ..compute.experts import (
    Groups, chosen_experts_output, combine, dispatch, few_tokens_at_inference, gather_slots, grouped_linear,
)
from ..compute.gated_activation import gated_activation
from .routing import Router, RouterLogitsRecorder, route
from .shared_expert import SharedExpertGate, with_shared_expert
from .stacking import StackSource


class StackedExperts(nn.Module):
    """E copies of one FFN, stored stacked: `gate_up_proj [E, 2f, d]` (gated) or `up_proj [E, f, d]`, and
    `down_proj [E, d, f]`, with `*_bias [E, out]` where the dense FFN has biases."""

    def __init__(self, layout: MlpLayout, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: nn.Module, up_bias: bool, down_bias: bool):
        super().__init__()
        self.num_experts = num_experts
        self.gated = layout.kind == "gated"
        self.up_name = "gate_up_proj" if self.gated else "up_proj"
        self.up_bias_name = f"{self.up_name}_bias"
        up_rows = 2 * intermediate_size if self.gated else intermediate_size
        self.register_parameter(self.up_name, nn.Parameter(torch.empty(num_experts, up_rows, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.register_parameter(
            f"{self.up_name}_bias", nn.Parameter(torch.zeros(num_experts, up_rows)) if up_bias else None
        )
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if down_bias else None
        if has_parameters(activation):
            # its parameters are the dense FFN's, averaged like attention: the MoE block keeps it under the dense
            # name (`mlp.act_fn.*`), so it is saved, averaged and loaded by that name; here it is only used
            object.__setattr__(self, "act_fn", activation)
        else:
            self.act_fn = activation
        for weight in (getattr(self, self.up_name), self.down_proj):
            nn.init.normal_(weight, std=0.02)

    backend = "auto"

    def activate(self, hidden: torch.Tensor) -> torch.Tensor:
        return gated_activation(hidden, self.act_fn) if self.gated else self.act_fn(hidden)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Every token `[N, d]` through its chosen experts `top_k_index [N, k]`, mixed by `top_k_weights [N, k]`.

        The signature of transformers' experts modules (`experts(hidden_states, top_k_index, top_k_weights)`), so
        tools that swap a fused kernel in for a model's experts (vLLM's Transformers backend) find ours as theirs.
        A few tokens at inference skip the sort (`forward_chosen`); otherwise slots are grouped by expert."""
        if few_tokens_at_inference(hidden_states.shape[0], top_k_index.shape[-1], self.num_experts,
                                   getattr(self, self.up_name), self.down_proj, getattr(self, self.up_bias_name),
                                   self.down_proj_bias):
            return self.forward_chosen(hidden_states, top_k_index, top_k_weights)
        plan = dispatch(top_k_index, top_k_weights, self.num_experts)
        return combine(self.forward_groups(gather_slots(hidden_states, plan), plan.groups), plan)

    def forward_groups(self, sorted_inputs: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Rows already sorted into contiguous per-expert groups, each through its expert (no mixing)."""
        up = getattr(self, self.up_name)
        hidden = grouped_linear(sorted_inputs, up, groups, getattr(self, self.up_bias_name), self.backend)
        return grouped_linear(self.activate(hidden), self.down_proj, groups, self.down_proj_bias, self.backend)

    def forward_chosen(self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's k slots through their own experts, mixed by `weights` (few tokens at inference; no sort)."""
        up = getattr(self, self.up_name)
        hidden = chosen_experts_output(tokens, up, getattr(self, self.up_bias_name), experts)
        return chosen_experts_output(self.activate(hidden), self.down_proj, self.down_proj_bias, experts, weights)


class SparseMoeBlock(nn.Module):
    """Router (`gate`) + stacked experts; every token goes to its top-k experts, none is dropped.

    With `shared_expert`, the dense FFN itself stays as `shared_expert` (Qwen2-MoE's name), always on, optionally
    weighted by a sigmoid `shared_expert_gate`; the output is then ``½ · routed + s(x) · shared`` (`shared_expert`)."""

    def __init__(self, dense_mlp: nn.Module, layout: MlpLayout, num_experts: int, top_k: int,
                 recorder: RouterLogitsRecorder | None = None, shared_expert: bool = False,
                 shared_expert_gate: bool = False):
        super().__init__()
        children = dict(dense_mlp.named_children())
        down = children[layout.down]
        hidden_size, intermediate_size = linear_shape(down)
        up_has_bias = any(getattr(children[name], "bias", None) is not None for name in layout.up)
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = Router(hidden_size, num_experts, recorder)
        # the dense FFN's output dropout (GPT-J, CodeGen), on the mixed output: the same in eval, and in training
        # each token's FFN output is dropped as the dense model drops it
        self.dropout = children[layout.dropout] if layout.dropout else None
        activation = activation_module(dense_mlp, layout)
        if has_parameters(activation):  # an activation with weights of its own (Apertus' xIELU), shared by experts
            if shared_expert:  # the shared expert keeps the base's own; the routed experts share their average
                activation = copy.deepcopy(activation)
            self.add_module(layout.activation, activation)
        self.experts = StackedExperts(layout, num_experts, hidden_size, intermediate_size, activation, up_has_bias,
                                      down.bias is not None)
        up_name = self.experts.up_name
        self.source_map: dict[str, StackSource] = {
            f"experts.{up_name}": StackSource(tuple(f"{n}.weight" for n in layout.up), transpose=layout.conv1d),
            "experts.down_proj": StackSource((f"{layout.down}.weight",), transpose=layout.conv1d),
        }
        if up_has_bias:
            self.source_map[f"experts.{up_name}_bias"] = StackSource(tuple(f"{n}.bias" for n in layout.up))
        if down.bias is not None:
            self.source_map["experts.down_proj_bias"] = StackSource((f"{layout.down}.bias",))
        # the dense FFN module itself, unchanged: its tensors keep their names one level down (`shared_expert.*`)
        self.shared_expert = dense_mlp if shared_expert else None
        self.shared_expert_gate = SharedExpertGate(hidden_size) if shared_expert and shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        weights, indices = route(self.gate(tokens), self.top_k, self.gate.selection_bias)
        routed = self._dropped(self.experts(tokens, indices, weights).reshape(shape))
        if self.shared_expert is None:
            return routed
        return with_shared_expert(routed, hidden_states, self.shared_expert, self.shared_expert_gate)

    def _dropped(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.dropout is None else self.dropout(output)
