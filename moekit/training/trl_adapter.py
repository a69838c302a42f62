"""The TRL adapter: TRL's trainers, adapted to composed models (`ComposedSFTTrainer`, `ComposedDPOTrainer`).

TRL computes its losses through a "fused LM head" that it patches onto the model: it runs `model.base_model` (a
composed model itself) for `last_hidden_state` and projects it through the LM head. Plain TRL trainers work: the
composed model's `last_hidden_state` carries its balance loss in training forwards (see `runtime.assembly.outputs`),
once per micro-batch. The composed trainers instead route TRL's fused calls through the model's own forward, compute the
per-token log-probabilities from its logits, and hand TRL the model's `aux_loss` (already weighted by the recipe's
`alpha`) with a weight of 1, which TRL adds once per optimised forward: SFT divides it over gradient-accumulation
steps, DPO adds it for the policy only, never the reference. They also log routing statistics (and run the automatic
alpha). The recipes `run_sft` and `run_dpo` (`sft.py`, `dpo.py`) build them.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import transformers
import trl
from torch import nn
from trl import DPOTrainer, SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ..errors import TrainingError
from .callbacks import add_routing_callbacks
from .checkpointing import CHECKPOINTING_ARGUMENT
from .composed import composed_model
from .lora import share_router_recorder

# The TRL range pyproject.toml requires (tests/test_trl_training.py checks that they agree): CI tests its newest release
# (`make test`) and its oldest (`make test-oldest`), so a new TRL minor is tested by the next CI run rather than
# excluded on the day it ships; one whose trainers lack what `adapt_trainer` needs is refused there, naming the range.
TESTED_TRL = ">=1.16,<2"


def fused_output(
    logits: torch.Tensor, labels: torch.Tensor, aux_loss: torch.Tensor | None, num_items_in_batch: Any = None
) -> FusedCausalLMOutput:
    """What TRL's fused LM head returns, from full next-token `logits` and `labels` aligned with them."""
    mask = labels != -100
    log_softmax = torch.log_softmax(logits.float(), dim=-1)
    log_probs = log_softmax.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1).masked_fill(~mask, 0.0)
        log_sum_sq_probs = torch.logsumexp(2 * log_softmax, dim=-1).masked_fill(~mask, 0.0)
        mean_logits = logits.float().mean(-1).masked_fill(~mask, 0.0)
        is_top1 = (logits.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / count
    if aux_loss is not None:
        loss = loss + aux_loss.to(loss.device)
    return FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
        is_top1=is_top1, label_mask=mask, aux_loss=aux_loss,
    )


def route_fused_head_through_forward(model: nn.Module) -> None:
    """Replace TRL's fused LM head on the composed model by one that runs the model's own forward."""
    composed = composed_model(model)
    forward = type(composed).forward

    @functools.wraps(forward)  # `generate` validates its kwargs against this signature
    def fused_forward(self, *args: Any, fused_lm_head: bool = False, labels: torch.Tensor | None = None,
                      shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return forward(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        outputs = forward(self, *args, **kwargs)
        logits = outputs.logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        aux_loss = outputs.aux_loss if kwargs.get("output_router_logits") else None
        return fused_output(logits, labels.to(logits.device), aux_loss, num_items_in_batch)

    composed.forward = types.MethodType(fused_forward, composed)


def adapt_trainer(trainer: transformers.Trainer) -> None:
    """After a TRL trainer's `__init__`: route its fused head through the model and let it add our aux loss."""
    for attribute in ("aux_loss_enabled", "router_aux_loss_coef"):
        if not hasattr(trainer, attribute):
            raise TrainingError(
                f"{type(trainer).__name__} has no `{attribute}`: TRL {trl.__version__} handles the MoE aux loss "
                f"differently from the releases moekit.training is tested with (trl{TESTED_TRL}, as pyproject.toml "
                "requires)"
            )
    composed = composed_model(trainer.model)
    check_checkpointing_keeps_balance_gradient(trainer.args, composed)
    share_router_recorder(composed)  # PEFT's copies of the routers must record into the model's recorder
    route_fused_head_through_forward(composed)
    if getattr(trainer, "ref_model", None) is not None:
        route_fused_head_through_forward(trainer.ref_model)
    # Our aux_loss already carries alpha; bts has no routers and no aux loss.
    trainer.aux_loss_enabled = bool(composed.routers())
    trainer.router_aux_loss_coef = 1.0
    if composed.routers():
        add_routing_callbacks(trainer)


def check_checkpointing_keeps_balance_gradient(args: transformers.TrainingArguments, composed: nn.Module) -> None:
    """Refuse, before training, checkpointing that the trainer made reentrant after `trainer_arguments` set it
    non-reentrant: TRL does so for PEFT models under DeepSpeed ZeRO-3 (trl#2514), and reentrant checkpointing drops
    the load-balancing loss's gradient (the model would stop at the first step, without saying why it happened)."""
    checkpointing = getattr(args, CHECKPOINTING_ARGUMENT, False)
    kwargs = getattr(args, f"{CHECKPOINTING_ARGUMENT}_kwargs", None) or {}
    if checkpointing and kwargs.get("use_reentrant") and composed.routers():
        raise TrainingError(
            "the trainer switched activation checkpointing to reentrant (TRL does so for LoRA under DeepSpeed ZeRO-3), "
            "which drops the load-balancing loss's gradient. Set `gradient_checkpointing: false` in the training "
            "config (gradient_checkpointing=False in Python), or use FSDP2 (examples/accelerate/fsdp2.yaml)"
        )


class ComposedSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for composed models: the loss runs the model's own forward and includes its aux loss once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        adapt_trainer(self)



class ComposedDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` for composed models: log-probabilities from the model's own forward, its aux loss added once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        adapt_trainer(self)
