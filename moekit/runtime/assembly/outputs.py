"""What a composed model's forward returns beyond transformers' MoE output, and how the balance loss rides on the
LM head's input for trainers that build their loss from the hidden states (TRL's fused head)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

@dataclass
class ComposedCausalLMOutput(MoeCausalLMOutputWithPast):
    """The causal-LM output, plus the hidden states the LM head saw (`last_hidden_state`).

    TRL's trainers patch a model with a fused LM head that runs `model.base_model` (here the model itself) for
    `last_hidden_state` and projects it through `get_output_embeddings()` without materialising the logits. In a
    training forward, `last_hidden_state` also carries the balance loss (see `with_auxiliary_loss`), so a loss built
    from it, as TRL's is, optimises the balance loss too.
    """

    last_hidden_state: torch.FloatTensor | None = None
    # The cache of a family that keeps its own under another name (transformers 5.17's xLSTM and Mamba
    # `cache_params`, RWKV's `state`, XLNet's `mems`, Reformer's `past_buckets_states`): `generate` reads it from the
    # output under that name and hands it back on the next step.
    cache_params: Any = None
    state: Any = None
    mems: Any = None
    past_buckets_states: Any = None



class TrainingRouting(NamedTuple):
    """What a training forward tells its routing hooks (`register_routing_hook`): the routers' names, their slot counts
    per expert over the global batch (summed over the data-parallel ranks; `[routers, E]`, no gradient), and the
    balance loss as added to the optimised loss (weighted, detached). Tensors stay on their device."""

    names: list[str]
    slots: torch.Tensor
    aux_loss: torch.Tensor


class _WithAuxiliaryLoss(torch.autograd.Function):
    """Identity on `hidden` whose backward also sends a gradient of one to `aux_loss`: whatever loss is computed from
    the returned tensor then includes `aux_loss` (once, with weight one), even if that loss never sees it.

    Only when the tensor takes part in the loss: DDP passes every output through its backward, with a zero gradient
    for those the loss does not use, and the balance loss must not be added a second time there."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.aux = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor | None):
        if gradient is None:
            return None, None
        shape, dtype, device = ctx.aux
        used = (gradient != 0).any().to(dtype=dtype, device=device)  # no host synchronisation
        return gradient, used.expand(shape).clone()


def with_auxiliary_loss(hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    return _WithAuxiliaryLoss.apply(hidden, aux_loss)
