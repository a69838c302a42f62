"""Mixtral: `traditional` over Llama or Mistral (every block an MoE, no shared expert, no biases)."""

from __future__ import annotations

from .base import ExportTarget


def _moe_fields(config, text: dict, routed: list[int], blocks: int) -> dict:
    return dict(num_local_experts=config.num_experts, router_jitter_noise=0.0)


MIXTRAL = ExportTarget(
    name="mixtral", families=("llama", "mistral"), source_description="Llama or Mistral",
    class_name="MixtralForCausalLM", moe_fields=_moe_fields, every_block="Mixtral", biases=False,
    expert_names=("block_sparse_moe.experts", "w1", "w3", "w2", "block_sparse_moe.gate.weight"),
)
