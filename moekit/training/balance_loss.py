"""What training wraps around the model's balance loss: counts over the data-parallel ranks, the weight for
`num_items_in_batch`, and the check that the loss kept its gradient.

The model computes its auxiliary loss as a pure function of its routers' outputs (`auxiliary_loss`); the loss the
trainer differentiates is still built inside the forward, so this wrapper is what the forward calls
(`MixtureKitForCausalLM.auxiliary_loss_wrapper`, installed on `import moekit`), also for FSDP/DDP loops that call the
model directly. The alpha controller and the routing statistics read each training forward's counts through
`register_routing_hook` (`callbacks`, `auto_alpha`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TrainingError
from .data_parallel import data_parallel_world_size, sum_over_ranks


def training_auxiliary_loss(
    model: Any, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None, loss_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, float | torch.Tensor, torch.Tensor]:
    """The model's auxiliary loss, the weight to add it to the LM loss with, and the slot counts `[routers, E]` it
    was computed from (over the global batch in a training step).

    In a training step (training mode, gradient on: not the no-grad forwards of a DPO reference or of generation)
    the counts are summed over the ranks, which all run it, in one collective for every router and the label count:
    each rank returns its share of the global batch's loss times the number of ranks, so that the mean over ranks
    (what DDP, FSDP and ZeRO average gradients to) is the loss of the global batch.

    The weight is 1, except where `transformers.Trainer` passes `num_items_in_batch`: it then multiplies the loss
    by the number of ranks and sums it over gradient-accumulation steps instead of averaging, as it does for the
    token-summed LM loss. The weight, this micro-batch's share of the step's label tokens divided by the number of
    ranks, undoes both, so the aux loss counts once per step at any rank count and accumulation.
    """
    num_items = (loss_kwargs or {}).get("num_items_in_batch")
    label_items = label_tokens(labels, loss_kwargs) if num_items is not None else None
    training_step = model.training and torch.is_grad_enabled()
    ranks = data_parallel_world_size() if training_step else 1

    def over_ranks(counts: torch.Tensor) -> torch.Tensor:
        nonlocal label_items
        if label_items is not None:
            counts = torch.cat([counts, label_items.to(counts).expand(1, counts.shape[1])])
        counts = sum_over_ranks(counts)
        if label_items is not None:
            counts, label_items = counts[:-1], counts[-1, 0]
        return counts

    aux_loss, slots = model.auxiliary_loss(router_logits, attention_mask, over_ranks if training_step else None)
    aux_loss = aux_loss * ranks
    routers_train = any(router.weight.requires_grad for _, router in model.routers())
    if training_step and routers_train and not aux_loss.requires_grad:
        # Only the forward can see the loss lost, at the first step, where the cause can still be named.
        raise TrainingError(
            "the load-balancing loss lost its gradient: reentrant activation checkpointing runs blocks without "
            "autograd. Enable it with {'use_reentrant': False} as the checkpointing kwargs "
            "(activation_checkpointing_kwargs from transformers 5.24, gradient_checkpointing_kwargs before)."
        )
    weight = 1.0
    if num_items is not None and label_items is not None:
        total = torch.as_tensor(num_items, device=aux_loss.device, dtype=torch.float32).clamp(min=1)
        weight = label_items.to(aux_loss.device, torch.float32) / total / ranks
    return aux_loss, weight, slots


def label_tokens(labels: torch.Tensor | None, loss_kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    """This micro-batch's label tokens, counted as `transformers.Trainer` counts `num_items_in_batch`."""
    shift_labels = (loss_kwargs or {}).get("shift_labels")
    if shift_labels is not None:
        return shift_labels.ne(-100).sum().float()
    return labels[..., 1:].ne(-100).sum().float() if labels is not None else None
