"""Qwen3-VL-MoE: `traditional` over Qwen3-VL, vision tower kept; its Hub layout is the packed one, transposed."""

from __future__ import annotations

from .base import ExportTarget, dense_blocks


def _moe_fields(config, text: dict, routed: list[int], blocks: int) -> dict:
    # its router always renormalises the top-k (no norm_topk_prob); no shared expert
    return dict(num_experts=config.num_experts, decoder_sparse_step=1, moe_intermediate_size=text["intermediate_size"],
                mlp_only_layers=dense_blocks(routed, blocks))


QWEN3_VL_MOE = ExportTarget(
    name="qwen3_vl_moe", families=("qwen3_vl",), source_description="Qwen3-VL",
    class_name="Qwen3VLMoeForConditionalGeneration", moe_fields=_moe_fields, image_text=True, expert_names=None,
    transposed_hub_layout=True,
)
