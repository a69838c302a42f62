"""`ExportTarget`: what the export needs to know about one native MoE architecture, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# (expert prefix under the block, gate name, up name, down name, router name under the block)
ExpertNames = tuple[str, str, str, str, str]
QWEN_EXPERT_NAMES: ExpertNames = ("mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate.weight")


@dataclass(frozen=True)
class ExportTarget:
    """One native MoE architecture. `moe_fields(config, text, routed, blocks)` returns the MoE fields of its text
    config (beside the base's own fields, which carry over): `config` the composition's, `text` its language
    config as a dict, `routed` the routed blocks, `blocks` how many there are."""

    name: str  # the target's model_type, and the name `--to` takes
    families: tuple[str, ...]  # the base model types whose `traditional` composition maps to it
    source_description: str  # those families, as the mapping table names them
    class_name: str  # the transformers class in `architectures`
    moe_fields: Callable[[Any, dict, list[int], int], dict]
    every_block: str | None = None  # its display name, when every block must be an MoE (no mlp_only_layers)
    shared_expert: bool = False  # a sigmoid-gated shared expert beside the routed ones (the composition's, or zero)
    image_text: bool = False  # the wrapper's config around the MoE text model's; the vision tower's weights unchanged
    biases: bool = True  # whether it takes a base with `mlp_bias` / `attention_bias`
    expert_names: ExpertNames | None = QWEN_EXPERT_NAMES  # the Hub's per-expert tensor names
    transposed_hub_layout: bool = False  # its Hub layout is the packed one, stored transposed (no per-expert names)

    @property
    def layers(self) -> str:
        """Where its decoder blocks are named in the checkpoint."""
        return "model.language_model.layers" if self.image_text else "model.layers"


def dense_blocks(routed: list[int], blocks: int) -> list[int]:
    """`mlp_only_layers`: the blocks that stay dense."""
    return [i for i in range(blocks) if i not in routed]
