"""Router (and stitch) training: the new parts of a composed model, on `transformers.Trainer`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PrinterCallback, Trainer, TrainingArguments

from ..errors import TrainingError
from .data_parallel import is_main_process
from .compilation import compile_decoder_blocks
from .callbacks import ThroughputCallback, add_routing_callbacks, save_model_and_log
from .freeze import TrainableSummary, apply_freeze_policy


def _collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of equal-length blocks; no KV cache in a training forward (it would only hold memory and, under
    `compile: true`, add a guard per block)."""
    ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def train_routers(
    model: torch.nn.Module,
    blocks: torch.Tensor | Dataset,
    output_dir: str | Path,
    policy: str | None = None,
    max_steps: int = 100,
    learning_rate: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    callbacks: list | None = None,
    save_steps: int | None = None,
    resume: bool | str = False,
    save_to: str | Path | None = None,
    tokenizer: Any = None,
    compile_blocks: bool = False,
    **training_args: Any,
) -> TrainableSummary:
    """Train what the composition added (routers; stitches for bts) on fixed-length token blocks.

    `blocks` is a `[n, length]` tensor of token ids or a `datasets.Dataset` with an `input_ids` column of equal
    lengths. The default policy is `routers` (`stitches` for bts). Routing statistics go to the trainer's log.
    With `save_steps`, checkpoints go to `output_dir`; `resume=True` (or a checkpoint path) continues from the last
    one, with the same result as an uninterrupted run. With `save_to`, the trained model (and `tokenizer`) is saved
    there by the trainer, which under `accelerate launch` gathers FSDP/ZeRO-3 shards and writes from one process.
    `batch_size` is per process: the global batch is `batch_size x processes x gradient_accumulation_steps`.
    With `compile_blocks`, each decoder block is compiled in place first (`compilation`).
    """
    if policy is None:
        policy = "stitches" if model.config.method == "bts" else "routers"
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise TrainingError(f"blocks must be a non-empty [n, length] tensor of token ids, got {list(blocks.shape)}")
        blocks = Dataset.from_dict({"input_ids": blocks.tolist()})
    if len(blocks) == 0:
        raise TrainingError("the training dataset is empty")
    if "input_ids" not in blocks.column_names:
        raise TrainingError(f"the dataset needs an `input_ids` column; it has {blocks.column_names}")
    summary = apply_freeze_policy(model, policy)
    if compile_blocks:
        compile_decoder_blocks(model)
    if progress and is_main_process():
        print(summary, flush=True)  # what trains, once, before the first step
    # The precision `accelerate launch --mixed_precision` (or its config) asked for; DeepSpeed checks they agree.
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    training_args = {"bf16": precision == "bf16", "fp16": precision == "fp16", **training_args}
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, seed=seed, data_seed=seed, report_to="none",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=max(1, max_steps // 5), disable_tqdm=not progress, lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 10), weight_decay=0.0, use_cpu=not torch.accelerator.is_available(),
        remove_unused_columns=False, **training_args,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=blocks, data_collator=_collate,
                      processing_class=tokenizer, callbacks=callbacks)
    add_routing_callbacks(trainer)
    block_length = len(blocks[0]["input_ids"])
    # First among the callbacks, like the routing statistics: the printer and the reporters then see what it adds.
    trainer.callback_handler.callbacks.insert(0, ThroughputCallback(
        batch_size * block_length * arguments.world_size * arguments.gradient_accumulation_steps))
    if not progress:
        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume or None)
    if save_to is not None:
        save_model_and_log(trainer, save_to)
    model.eval()
    return summary
