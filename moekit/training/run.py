"""Run one training config end to end: load, (initialise routers), train, save."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import TrainingError
from .data_parallel import is_main_process, wait_for_all_ranks
from .checkpointing import checkpointing_arguments
from .config import TrainConfig
from ..data import load_data, token_blocks
from .output_guard import begin_run, check_output
from .router_init import initialize_routers
from .routers import train_routers


def run_training(config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Train as configured and save the result (model and tokenizer) to `config.output`.

    The output must be new (or `overwrite`), or, with `resume`, hold the run this config started (`output_guard`).
    Runs unchanged under `accelerate launch` (DDP, FSDP2, DeepSpeed ZeRO-3): `batch_size` is per process, and the
    trainer writes the output from the main process only.
    """
    from accelerate import PartialState

    PartialState()  # under `accelerate launch`, join the process group now: the output checks below are per rank
    output = Path(config.output)
    check_output(config, resume, overwrite)
    if config.stage in ("sft", "dpo"):
        _run_trl_stage(config, output, resume, progress, overwrite)
    else:
        _run_router_stage(config, output, resume, progress, overwrite)
    wait_for_all_ranks()  # rank 0 writes; no rank returns before the output is whole
    return output


def _run_trl_stage(config: TrainConfig, output: Path, resume: bool, progress: bool, overwrite: bool) -> None:
    from .dpo import run_dpo
    from .sft import run_sft

    required = ("chosen", "rejected") if config.stage == "dpo" else ()
    dataset = load_data(config.data, required_columns=required)
    run = run_dpo if config.stage == "dpo" else run_sft
    begin_run(config, resume, overwrite)
    run(config.model, dataset, output, lora=config.lora, max_steps=config.max_steps,
        target_modules=config.target_modules, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, seed=config.seed, progress=progress, resume=resume,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.checkpointing,
        **({"save_strategy": "steps", "save_steps": config.save_steps} if config.save_steps else {}))


def _run_router_stage(config: TrainConfig, output: Path, resume: bool, progress: bool, overwrite: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(config.model)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    blocks = token_blocks(load_data(config.data, required_columns=(config.text_column,)), tokenizer,
                          config.block_size, config.text_column)
    if config.router_init != "keep" and not resume:
        if not config.router_init_data:
            raise TrainingError(f"router_init: {config.router_init} needs router_init_data: {{expert name: file}}")
        samples = {name: load_data(path, required_columns=(config.text_column,))[config.text_column][:64]
                   for name, path in config.router_init_data.items()}
        initialize_routers(model, tokenizer, config.router_init, samples, progress=progress and is_main_process())
    begin_run(config, resume, overwrite)
    train_routers(model, blocks, output / "checkpoints", policy=config.policy, max_steps=config.max_steps,
                  learning_rate=config.learning_rate, batch_size=config.batch_size, seed=config.seed,
                  progress=progress, save_steps=config.save_steps, resume=resume, save_to=output, tokenizer=tokenizer,
                  gradient_accumulation_steps=config.gradient_accumulation_steps, compile_blocks=config.compile,
                  **checkpointing_arguments(config.checkpointing))
