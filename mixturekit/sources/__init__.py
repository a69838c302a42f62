"""Sources: find source models on disk or the Hub, read their tensors lazily, write shards one tensor at a time."""

from .gguf import convert_gguf, default_cache_dir
from .resolve import LocalModel, resolve_source
from .safetensors_io import CheckpointReader, ShardWriter, TensorInfo, TensorSlot, read_header

__all__ = [
    "CheckpointReader", "LocalModel", "ShardWriter", "TensorInfo", "TensorSlot", "convert_gguf",
    "default_cache_dir", "read_header", "resolve_source",
]
