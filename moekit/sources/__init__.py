"""Sources: find source models on disk or the Hub, read their tensors lazily, write checkpoint folders one tensor at a
time (staged beside the output, swapped into place whole)."""

from .checkpoint_folder import (
    JOURNAL_PREFIX, RETIRED_PREFIX, STAGING_PREFIX, assign_shards, check_output_folder, copy_tokenizer_files,
    describe_own_output, new_staging_folder, recover_interrupted_swap, refuse_foreign_output, staged_output,
    swap_into_place, write_sharded,
)
from .gguf import convert_gguf, default_cache_dir
from .resolve import LocalModel, resolve_source, weight_files
from .safetensors_io import CheckpointReader, ShardWriter, TensorInfo, TensorSlot, read_header

__all__ = [
    "JOURNAL_PREFIX", "RETIRED_PREFIX", "STAGING_PREFIX", "CheckpointReader", "LocalModel", "ShardWriter", "TensorInfo",
    "TensorSlot", "assign_shards", "check_output_folder", "convert_gguf", "copy_tokenizer_files", "default_cache_dir",
    "describe_own_output", "new_staging_folder", "read_header", "recover_interrupted_swap", "refuse_foreign_output",
    "resolve_source", "staged_output", "swap_into_place", "weight_files", "write_sharded",
]
