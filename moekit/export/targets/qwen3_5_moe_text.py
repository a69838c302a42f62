"""Qwen3.5-MoE's text model: `traditional` over Qwen3.5's text model (Gated DeltaNet beside attention)."""

from __future__ import annotations

from .base import ExportTarget


def qwen3_5_moe_fields(config, text: dict, routed: list[int], blocks: int) -> dict:
    """Its router always renormalises; every block is an MoE; the shared expert the composition's or width-1 zero."""
    shared = getattr(config, "shared_expert", None) is not None
    return dict(num_experts=config.num_experts, moe_intermediate_size=text["intermediate_size"],
                shared_expert_intermediate_size=text["intermediate_size"] if shared else 1)


QWEN3_5_MOE_TEXT = ExportTarget(
    name="qwen3_5_moe_text", families=("qwen3_5_text",), source_description="Qwen3.5's text model",
    class_name="Qwen3_5MoeForCausalLM", moe_fields=qwen3_5_moe_fields, every_block="Qwen3.5-MoE",
    shared_expert=True,
)
