"""`moekit train CONFIG.yaml`: one typed config per training run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import TrainingError
from ..recipe.recipe import explain_validation_error


class TrainConfig(BaseModel):
    """What to train, on what, and where to write it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Composed checkpoint folder (or Hub id).")
    stage: Literal["router", "sft", "dpo"] = Field(default="router")
    data: str = Field(description="Local JSON/JSONL/Parquet/CSV/text file, or a `datasets` name.")
    text_column: str = "text"
    block_size: int = Field(default=256, ge=8)
    output: str
    policy: str | None = Field(default=None, description="Freeze policy; default: routers (stitches for bts).")
    max_steps: int = Field(default=200, ge=1)
    learning_rate: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=8, ge=1, description="Per process: under `accelerate launch` the global batch "
                            "is batch_size x processes x gradient_accumulation_steps.")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    save_steps: int | None = Field(default=None, ge=1, description="Checkpoint every N steps (needed to resume).")
    seed: int = 0
    router_init: Literal["keep", "data", "hidden"] = Field(
        default="keep", description="Before training, set the routers from `router_init_data`: data fits each router "
        "as a classifier of the experts' domain samples; hidden points each expert's row at the mean hidden state of "
        "its prompts (as mergekit-moe does). keep: as composed (the recipe's router_init)."
    )
    router_init_data: dict[str, str] | None = Field(
        default=None, description="Expert name -> a file of its domain sample (data) or its prompts (hidden).")
    lora: bool = Field(default=True, description="sft/dpo: train LoRA adapters (routers and stitches in full).")
    target_modules: list[str] | None = Field(default=None, description="sft/dpo: LoRA targets; default: attention.")
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations in backward (less memory, about a third more compute). "
        "Default: on for sft/dpo, off for router (turn it on for `policy: full` of a large model); off for LoRA "
        "under DeepSpeed ZeRO-3.")
    compile: bool = Field(
        default=False, description="router stage: compile each decoder block with torch.compile (regional). At "
        "SmolLM2's shape on an H200 it trained btx routers 1.41x faster, after about a minute of compiling: worth it "
        "from about a thousand steps (docs/performance.md, round five).")

    @model_validator(mode="after")
    def _compile_is_for_the_router_stage(self) -> TrainConfig:
        if self.compile and self.stage != "router":
            raise ValueError(f"compile: true is for stage: router; stage {self.stage} trains through TRL, "
                             "which compiles the whole model with its own `torch_compile` argument (not exposed "
                             "here)")
        return self

    @property
    def checkpointing(self) -> bool:
        """Whether this run recomputes activations: as set, else the stage's default."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return self.stage in ("sft", "dpo")


def load_train_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"training config '{path}' does not exist")
    try:
        return TrainConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except ValidationError as error:
        message = explain_validation_error(error, f"training config '{path}'", lambda _: sorted(TrainConfig.model_fields))
        raise TrainingError(message) from None
