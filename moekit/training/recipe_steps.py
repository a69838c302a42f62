"""What the SFT and DPO recipes share: check the dataset, load the model (with a LoRA config) and the tokenizer,
build quiet TRL arguments with non-reentrant checkpointing, train and save, with the upstream progress bars off."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch
import transformers
from datasets import Dataset, DatasetDict, IterableDataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PrinterCallback
from trl.data_utils import is_conversational

from ..errors import TrainingError
from .callbacks import save_model_and_log
from .checkpointing import checkpointing_arguments
from .composed import composed_model
from .lora import lora_config_for
from .upstream_warnings import upstream_checkpointing_renames_silenced


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
