"""The native MoE architectures a composition exports to, one module per target behind `ExportTarget`.
`EXPORT_TARGETS` is the registry (the CLI's `--to` reads it); `target_for_family` picks one by the base's family."""

from __future__ import annotations

from .base import ExportTarget
from .mixtral import MIXTRAL
from .qwen2_moe import QWEN2_MOE
from .qwen3_5_moe import QWEN3_5_MOE
from .qwen3_5_moe_text import QWEN3_5_MOE_TEXT
from .qwen3_moe import QWEN3_MOE
from .qwen3_vl_moe import QWEN3_VL_MOE

# In the order the mapping table names them.
EXPORT_TARGETS: dict[str, ExportTarget] = {
    target.name: target
    for target in (MIXTRAL, QWEN3_MOE, QWEN2_MOE, QWEN3_5_MOE_TEXT, QWEN3_VL_MOE, QWEN3_5_MOE)
}
# The base model's family -> the target its `traditional` composition exports to.
TARGETS: dict[str, str] = {family: target.name for target in EXPORT_TARGETS.values() for family in target.families}
MAPPING_TABLE = "traditional " + "; ".join(
    f"over {target.source_description} -> {target.name}" for target in EXPORT_TARGETS.values())


def target_for_family(family: str) -> ExportTarget | None:
    """The target a `traditional` composition over `family` (the base's model type) exports to, if any."""
    name = TARGETS.get(family)
    return EXPORT_TARGETS[name] if name else None


__all__ = ["EXPORT_TARGETS", "MAPPING_TABLE", "TARGETS", "ExportTarget", "target_for_family"]
