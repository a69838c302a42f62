"""Export: write a composition as a native MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3.5-MoE, Qwen3-VL-MoE)
for serving engines; the targets are a registry (`targets`), one module each."""

from .native import ExportError, export
from .targets import EXPORT_TARGETS, MAPPING_TABLE, TARGETS

__all__ = ["EXPORT_TARGETS", "MAPPING_TABLE", "TARGETS", "ExportError", "export"]
