"""Export: write a composition as a native MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) for serving engines."""

from .native import MAPPING_TABLE, TARGETS, ExportError, export

__all__ = ["MAPPING_TABLE", "TARGETS", "ExportError", "export"]
