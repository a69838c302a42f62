"""Qwen3.5-MoE, image-text: `traditional` over Qwen3.5, vision tower, projector and processor kept."""

from __future__ import annotations

from .base import ExportTarget
from .qwen3_5_moe_text import qwen3_5_moe_fields

QWEN3_5_MOE = ExportTarget(
    name="qwen3_5_moe", families=("qwen3_5",), source_description="Qwen3.5 (image-text)",
    class_name="Qwen3_5MoeForConditionalGeneration", moe_fields=qwen3_5_moe_fields, every_block="Qwen3.5-MoE",
    shared_expert=True, image_text=True,
)
