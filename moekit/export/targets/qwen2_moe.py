"""Qwen2-MoE: `traditional` over Qwen2, its shared expert the composition's (or a width-1 zero one)."""

from __future__ import annotations

from .base import ExportTarget
from .qwen3_moe import qwen_moe_fields


def _moe_fields(config, text: dict, routed: list[int], blocks: int) -> dict:
    # the composition's shared expert is the base's whole FFN; else a width-1 zero one
    shared = getattr(config, "shared_expert", None) is not None
    return dict(qwen_moe_fields(config, text, routed, blocks),
                shared_expert_intermediate_size=text["intermediate_size"] if shared else 1)


QWEN2_MOE = ExportTarget(
    name="qwen2_moe", families=("qwen2",), source_description="Qwen2", class_name="Qwen2MoeForCausalLM",
    moe_fields=_moe_fields, shared_expert=True,
)
