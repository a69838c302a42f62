"""Direct preference optimisation of a composed model on TRL's `DPOTrainer` (as `ComposedDPOTrainer`), with PEFT
LoRA by default: a recipe of the shared steps (`recipe_steps`) around the TRL adapter (`trl_adapter`).

DPO's loss is built by TRL from per-token log-probabilities, not from the model's `loss`, so the MoE aux loss is added
by TRL's own MoE branch, which `adapt_trainer` switches on: once per step, from the policy forward over the batch of
chosen and rejected completions; the reference forward (the adapter disabled, or a frozen copy) adds none.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import transformers
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig

from .recipe_steps import check_dataset, load_tokenizer, prepare_model, quiet, train_and_save, trainer_arguments
from .trl_adapter import ComposedDPOTrainer

DPO_FORMATS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


def run_dpo(
    model_or_path: nn.Module | str | Path,
    dataset: Dataset | IterableDataset | list[dict[str, Any]],
    output_dir: str | Path,
    lora: bool = True,
    max_steps: int = 100,
    *,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    lora_config: LoraConfig | None = None,
    target_modules: list[str] | None = None,
    ref_model: nn.Module | None = None,
    gradient_checkpointing: bool = True,
    progress: bool = False,
    save: bool = True,
    callbacks: list[transformers.TrainerCallback] | None = None,
    resume: bool | str = False,
    **training_args: Any,
) -> ComposedDPOTrainer:
    """DPO on a composed model (a checkpoint folder or a loaded model) with TRL; returns the trainer after training.

    `dataset` has `prompt`, `chosen` and `rejected` (strings, or conversations rendered with the tokenizer's chat
    template; without `prompt`, TRL takes the shared beginning of chosen and rejected). With `lora` the reference is
    the same model with its adapter disabled; without it, `ref_model` or a frozen copy of the starting model.
    `training_args` go to `trl.DPOConfig` (e.g. `beta`, `loss_type`).
    """
    dataset, first = check_dataset(dataset, DPO_FORMATS, "DPO")
    model, peft_config = prepare_model(model_or_path, lora, lora_config, target_modules, training_args.get("seed", 42))
    tokenizer = load_tokenizer(model, tokenizer, first)
    if ref_model is None and peft_config is None and not isinstance(model, PeftModel):
        # TRL would reload the checkpoint by path, which fails on our config (no `auto_map`); a frozen copy of the
        # policy is also the right reference for a model changed in memory.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    args = DPOConfig(**trainer_arguments(output_dir, max_steps, gradient_checkpointing, progress, training_args))
    with quiet(not progress):
        trainer = ComposedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                                     processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    train_and_save(trainer, output_dir, progress, save, resume)
    return trainer
