"""Supervised fine-tuning of a composed model on TRL's `SFTTrainer` (as `ComposedSFTTrainer`), with PEFT LoRA by
default: a recipe of the shared steps (`recipe_steps`) around the TRL adapter (`trl_adapter`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from torch import nn
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig

from .recipe_steps import check_dataset, load_tokenizer, prepare_model, quiet, train_and_save, trainer_arguments
from .trl_adapter import ComposedSFTTrainer

SFT_FORMATS = (("text",), ("messages",), ("prompt", "completion"), ("input_ids",))


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
