"""Qwen3-MoE: `traditional` over Qwen3 (dense blocks through `mlp_only_layers`, renormalised top-k)."""

from __future__ import annotations

from .base import ExportTarget, dense_blocks


def qwen_moe_fields(config, text: dict, routed: list[int], blocks: int) -> dict:
    """The fields Qwen2-MoE and Qwen3-MoE share: renormalised top-k, dense blocks through `mlp_only_layers`."""
    return dict(num_experts=config.num_experts, norm_topk_prob=True, decoder_sparse_step=1,
                moe_intermediate_size=text["intermediate_size"], mlp_only_layers=dense_blocks(routed, blocks))


QWEN3_MOE = ExportTarget(
    name="qwen3_moe", families=("qwen3",), source_description="Qwen3", class_name="Qwen3MoeForCausalLM",
    moe_fields=qwen_moe_fields,
)
