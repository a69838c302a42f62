"""Supervised fine-tuning of a composed model on `trl.SFTTrainer`, with PEFT LoRA by default.

TRL 1.16 computes its losses through a "fused LM head" that it patches onto the model: it runs `model.base_model`
(a composed model itself) for `last_hidden_state` and projects it through the LM head. Plain TRL trainers work: the
composed model's `last_hidden_state` carries its balance loss in training forwards (see `runtime.modeling`), once
per micro-batch. `ComposedSFTTrainer` (and the DPO one) instead route TRL's fused calls through the model's own
forward, compute the per-token log-probabilities from its logits, and hand TRL the model's `aux_loss` (already
weighted by the recipe's `alpha`) with a weight of 1, which TRL adds once per optimised forward: SFT divides it over
gradient-accumulation steps, DPO adds it for the policy only, never the reference. They also log routing statistics.
"""

from __future__ import annotations

import contextlib
import functools
import types
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch
import transformers
from datasets import Dataset, DatasetDict, IterableDataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PrinterCallback
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import FusedCausalLMOutput

from ..errors import TrainingError
from .callbacks import add_routing_callbacks, save_model_and_log
from .checkpointing import CHECKPOINTING_ARGUMENT, checkpointing_arguments
from .lora import composed_model, lora_config_for, share_router_recorder
from .upstream_warnings import upstream_checkpointing_renames_silenced

SFT_FORMATS = (("text",), ("messages",), ("prompt", "completion"), ("input_ids",))


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
                f"{type(trainer).__name__} has no `{attribute}`: this TRL version handles the MoE aux loss differently "
                f"from TRL 1.16, which mixturekit.training was written against"
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


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silence the datasets / transformers progress bars while TRL prepares data (restored afterwards); PEFT's and
    TRL's calls of renamed transformers APIs are silenced either way (see `upstream_warnings`)."""
    with upstream_checkpointing_renames_silenced():
        if not enabled:
            yield
            return
        with _no_progress_bars():
            yield


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    datasets_were_on = not datasets.are_progress_bars_disabled()
    transformers_were_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_were_on:
            datasets.enable_progress_bars()
        if transformers_were_on:
            transformers.utils.logging.enable_progress_bar()


def check_dataset(
    dataset: Dataset | IterableDataset | list[dict[str, Any]], formats: tuple[tuple[str, ...], ...], task: str
) -> tuple[Dataset | IterableDataset, dict[str, Any]]:
    """The dataset (a list of rows becomes a `Dataset`) and its first row; a clear error if it is empty or lacks
    the columns of every format the trainer accepts."""
    if isinstance(dataset, DatasetDict):
        raise TrainingError(f"the {task} dataset is a DatasetDict with splits {list(dataset)}; pass one split")
    if isinstance(dataset, list):
        if not dataset:
            raise TrainingError(f"the {task} dataset is empty")
        dataset = Dataset.from_list(dataset)
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TrainingError(
            f"the {task} dataset must be a datasets.Dataset or a list of rows, got {type(dataset).__name__}")
    first = next(iter(dataset), None)
    if first is None:
        raise TrainingError(f"the {task} dataset is empty")
    columns = list(dataset.column_names or first)
    if not any(set(needed) <= set(columns) for needed in formats):
        wanted = " or ".join("+".join(needed) for needed in formats)
        raise TrainingError(f"the {task} dataset has columns {columns}; it needs {wanted}")
    return dataset, first


def load_tokenizer(model: nn.Module, tokenizer: PreTrainedTokenizerBase | str | Path | None,
                   first_row: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer passed, or the one saved with the composed checkpoint; conversational data needs its template."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        source = tokenizer or composed_model(model).config.name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as error:
            raise TrainingError(f"no tokenizer could be loaded from '{source}' ({error}); pass tokenizer=") from None
    if is_conversational(first_row) and not tokenizer.chat_template:
        raise TrainingError("the dataset is conversational but the tokenizer has no chat_template; set one on it")
    return tokenizer


def prepare_model(
    model_or_path: nn.Module | str | Path, lora: bool, lora_config: LoraConfig | None,
    target_modules: list[str] | None, seed: int = 42,
) -> tuple[nn.Module, LoraConfig | None]:
    """The composed model (loaded if given a path) and, with `lora`, the LoRA config the trainer wraps it with.

    The trainer applies PEFT itself: handed a `PeftModel`, TRL's DPO would take it for a pretrained adapter and train
    against a frozen copy of it. The seed is set here because PEFT's random LoRA init runs before the trainer seeds.
    """
    if isinstance(model_or_path, (str, Path)):
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(str(model_or_path))
    else:
        model = model_or_path
    composed_model(model)
    if isinstance(model, PeftModel):
        if lora_config is not None or target_modules is not None:
            raise TrainingError("the model already carries a PEFT adapter; pass the bare composed model to set LoRA")
        return model, None
    if not lora:
        if lora_config is not None or target_modules is not None:
            raise TrainingError("lora_config / target_modules were given with lora=False")
        return model, None
    transformers.set_seed(seed)
    return model, lora_config or lora_config_for(model, target_modules=target_modules)


def trainer_arguments(
    output_dir: str | Path, max_steps: int, gradient_checkpointing: bool, progress: bool,
    training_args: dict[str, Any],
) -> dict[str, Any]:
    """Quiet defaults for a TRL config, non-reentrant checkpointing enforced (reentrant would drop the aux loss's
    gradient, and the model refuses it); `training_args` override the rest."""
    training_args = dict(training_args)
    if "router_aux_loss_coef" in training_args:
        raise TrainingError("router_aux_loss_coef is not used: the composed model's config.alpha weights its aux loss")
    checkpoint_kwargs = {"use_reentrant": False}
    for key in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        checkpoint_kwargs.update(training_args.pop(key, None) or {})
    if checkpoint_kwargs["use_reentrant"]:
        raise TrainingError(
            "reentrant activation checkpointing runs blocks without autograd and drops the load-balancing loss's "
            "gradient; use gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if key in training_args:
            gradient_checkpointing = bool(training_args.pop(key))
    defaults = dict(
        report_to="none", disable_tqdm=not progress, save_strategy="no", logging_steps=max(1, max_steps // 10),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without an accelerator the trainer must be told, or under `accelerate launch` each CPU process trains alone.
        use_cpu=not torch.accelerator.is_available(),
    )
    return {**defaults, **training_args, "output_dir": str(output_dir), "max_steps": max_steps,
            **checkpointing_arguments(gradient_checkpointing, **checkpoint_kwargs)}


def train_and_save(
    trainer: transformers.Trainer, output_dir: str | Path, progress: bool, save: bool, resume: bool | str = False
) -> None:
    """Train (from the last checkpoint in `output_dir` with `resume`); save the adapter (or the model) and the
    tokenizer to `output_dir`."""
    if not progress:
        trainer.remove_callback(PrinterCallback)
    with quiet(not progress):
        trainer.train(resume_from_checkpoint=resume or None)
        if save:
            save_model_and_log(trainer, output_dir)


def run_sft(
    model_or_path: nn.Module | str | Path,
    dataset: Dataset | IterableDataset | list[dict[str, Any]],
    output_dir: str | Path,
    lora: bool = True,
    max_steps: int = 100,
    *,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    lora_config: LoraConfig | None = None,
    target_modules: list[str] | None = None,
    gradient_checkpointing: bool = True,
    progress: bool = False,
    save: bool = True,
    callbacks: list[transformers.TrainerCallback] | None = None,
    resume: bool | str = False,
    **training_args: Any,
) -> ComposedSFTTrainer:
    """SFT a composed model (a checkpoint folder or a loaded model) with TRL; returns the trainer after training.

    `dataset` is any format `SFTTrainer` reads: `text`, conversational `messages` (rendered with the tokenizer's chat
    template), `prompt` + `completion`, or tokenized `input_ids`. With `lora` the model is wrapped by
    `lora_config_for` (or `lora_config`): attention (and traditional experts) get LoRA, routers and bts stitches train
    in full; without it, whatever requires grad trains (bts: the stitches). The adapter (or the model) and the
    tokenizer are saved to `output_dir`. `training_args` go to `trl.SFTConfig`.
    """
    text_field = training_args.get("dataset_text_field", "text")
    formats = tuple((text_field,) if needed == ("text",) else needed for needed in SFT_FORMATS)
    dataset, first = check_dataset(dataset, formats, "SFT")
    model, peft_config = prepare_model(model_or_path, lora, lora_config, target_modules, training_args.get("seed", 42))
    tokenizer = load_tokenizer(model, tokenizer, first)
    args = SFTConfig(**trainer_arguments(output_dir, max_steps, gradient_checkpointing, progress, training_args))
    with quiet(not progress):
        trainer = ComposedSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                     peft_config=peft_config, callbacks=callbacks)
    train_and_save(trainer, output_dir, progress, save, resume)
    return trainer
