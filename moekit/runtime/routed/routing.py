"""Top-k routing in float32 and the per-expert selection bias of loss-free balancing (DeepSeek-V3): a bias added to
the logits for choosing the experts only, never to their weights. The balance loss of the routers' outputs is
`balance`'s."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


_DEBUG_CHECKS = os.environ.get("MIXTUREKIT_DEBUG", "") not in ("", "0")


def set_debug_checks(enabled: bool) -> None:
    """Check every router's input for NaN/inf and raise instead of routing silently (also: MIXTUREKIT_DEBUG=1).
    Off by default: the check costs a device synchronisation per router."""
    global _DEBUG_CHECKS
    _DEBUG_CHECKS = enabled


class RouterLogitsRecorder:
    """Collects every router's logits during one forward pass of the model that owns it.

    It records only while the model's forward is running, so the recomputation that activation checkpointing runs
    during backward does not record a second copy.
    """

    def __init__(self) -> None:
        self.active = False
        self.logits: list[torch.Tensor] = []
        self.names: list[str] = []
        self.biases: list[torch.Tensor | None] = []  # each router's selection bias (None: none), beside its logits

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.active, self.logits, self.names, self.biases = True, [], [], []
        try:
            yield self.logits
        finally:
            self.active = False

    def record(self, name: str, logits: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if self.active:
            self.names.append(name)
            self.logits.append(logits)
            self.biases.append(bias)


class _Float32Logits(torch.autograd.Function):
    """`hidden @ weight.T` in float32 from 16-bit `hidden` and `weight` of one dtype (CUDA): the product accumulates
    and is returned in float32, as the float32 product of the upcast operands is, without writing a float32 copy of
    `hidden` (as wide as the FFN for a routed down projection), and by a matrix kernel rather than a float32
    matrix-vector one for the few expert columns. The input gradient is computed in float32 as autograd would; the
    weight gradient, stored in the weight's 16-bit dtype, is the product of the logit gradient rounded to it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        hidden_gradient = weight_gradient = None
        if ctx.needs_input_grad[0]:
            hidden_gradient = torch.mm(gradient, weight.float()).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            weight_gradient = torch.mm(gradient.t().to(hidden.dtype), hidden, out_dtype=torch.float32).to(weight.dtype)
        return hidden_gradient, weight_gradient


def float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits `[..., E]` in float32 for any input dtype."""
    if (hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype
            and not torch.compiler.is_compiling()):
        flat = hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled():
            logits = _Float32Logits.apply(flat, weight)
        else:  # decoding: the same product without the autograd Function's host time
            logits = torch.mm(flat, weight.t(), out_dtype=torch.float32)
        return logits.view(*hidden.shape[:-1], weight.shape[0])
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(hidden, weight)  # no conversions to dispatch: a decoding step calls this once per router
    return F.linear(hidden.float(), weight.float())


class Router(nn.Module):
    """A linear gate `[num_experts, hidden]` whose logits are always computed in float32.

    `expert_bias` `[num_experts]` (float32, saved with the weights, zeros when a checkpoint has none) is the selection
    bias of loss-free balancing (`balance: bias`): added to the logits to choose the top k only (`route`), and
    nudged towards equal load by training (`training.BiasBalanceCallback`). It applies only where `bias_routing` is
    set (the model sets it from `config.balance`), so under `balance: loss` routing is exactly as without it.
    """

    def __init__(self, hidden_size: int, num_experts: int, recorder: RouterLogitsRecorder | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.num_experts, self.hidden_size = num_experts, hidden_size  # the weight's own shape is [0] under ZeRO-3
        # Saved only while it routes (`use_selection_bias`): a checkpoint under `balance: loss` holds no float32 zeros,
        # and nothing that sharding or adapter saving would have to handle beside the weights.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        # Plain attributes (not modules): several routers share one recorder; the model sets the name and whether the
        # selection bias applies.
        object.__setattr__(self, "recorder", recorder)
        object.__setattr__(self, "qualified_name", "")
        object.__setattr__(self, "bias_routing", False)
        # Experts opted out at inference (`disable_experts`): their logits are -inf, so top-k runs over the rest.
        object.__setattr__(self, "disabled_experts", ())
        object.__setattr__(self, "_disabled_masks", {})

    def disable_experts(self, indices: list[int] | tuple[int, ...]) -> None:
        """Mask these experts' logits to -inf from now on (an empty list enables every expert again): the same
        routing, weights and output as a router without their rows (`moekit edit --remove`)."""
        object.__setattr__(self, "disabled_experts", tuple(sorted(set(indices))))
        object.__setattr__(self, "_disabled_masks", {})

    def disabled_mask(self, device: torch.device) -> torch.Tensor:
        """`[E]` bool, true for the disabled experts, made once per device (no host copy in every forward)."""
        mask = self._disabled_masks.get(device)
        if mask is None:
            mask = torch.zeros(self.num_experts, dtype=torch.bool)
            mask[list(self.disabled_experts)] = True
            mask = self._disabled_masks[device] = mask.to(device)
        return mask

    def use_selection_bias(self, enabled: bool) -> None:
        """Route with `expert_bias` (and save it with the weights) or not."""
        object.__setattr__(self, "bias_routing", enabled)
        if enabled:
            self._non_persistent_buffers_set.discard("expert_bias")
        else:
            self._non_persistent_buffers_set.add("expert_bias")

    @property
    def selection_bias(self) -> torch.Tensor | None:
        """The bias `route` adds to the logits to choose experts: `expert_bias` under `balance: bias`, else None."""
        return self.expert_bias if self.bias_routing else None

    def _apply(self, fn, recurse: bool = True):
        """As `nn.Module._apply`, but `expert_bias` stays float32 when the model is cast (`.to(bfloat16)`, loading
        in 16 bits): its updates are far below a 16-bit step near its values, and casting it would lose them."""
        bias = self._buffers.get("expert_bias")
        super()._apply(fn, recurse)
        moved = self._buffers.get("expert_bias")
        if bias is not None and moved is not None and moved.dtype != torch.float32 and bias.dtype == torch.float32:
            self._buffers["expert_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _DEBUG_CHECKS and not torch.isfinite(hidden_states).all():
            from ...errors import RoutingNumericsError

            bad = (~torch.isfinite(hidden_states)).any(-1).nonzero().flatten()[:5].tolist()
            raise RoutingNumericsError(
                f"router {self.qualified_name or '(unnamed)'} got non-finite hidden states (NaN or inf) at token "
                f"rows {bad}: an earlier layer overflowed or the input is corrupt; try float32 or bfloat16 over float16"
            )
        logits = float32_logits(hidden_states, self.weight)
        if self.disabled_experts:
            logits = logits.masked_fill(self.disabled_mask(logits.device), float("-inf"))
        if self.recorder is not None:
            self.recorder.record(self.qualified_name, logits, self.selection_bias)
        return logits

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}"


def route(
    router_logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, keep the top k, renormalise their weights to sum to 1.

    With `expert_bias` `[E]` (loss-free balancing), the k experts are the top k of `logits + expert_bias`, and their
    weights the softmax of their unbiased logits: the bias changes which experts run, never how they are mixed, so
    for a given choice the output and its gradient are those without bias (DeepSeek-V3).

    Returns (weights `[N, k]` float32, expert indices `[N, k]`).
    """
    logits = router_logits if router_logits.dtype == torch.float32 else router_logits.float()
    if expert_bias is None:
        # The top k of the softmax are the top k logits, and their renormalised probabilities are the softmax of those
        # k logits alone: two kernels instead of four, which matters when decoding one token at a time.
        top_logits, indices = torch.topk(logits, top_k, dim=-1)
    else:
        indices = torch.topk(logits + expert_bias.to(logits.device, torch.float32), top_k, dim=-1).indices
        top_logits = logits.gather(-1, indices)
    return torch.softmax(top_logits, dim=-1), indices
