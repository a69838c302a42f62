"""The original MixtureKit's checkpoints brought over to this format (`moekit convert-original`): its config and
tensor names read, each of our tensors planned from them, the stitches mapped, the result streamed into our shards."""

from .convert import Conversion, OriginalCheckpointError, convert_original

__all__ = ["Conversion", "OriginalCheckpointError", "convert_original"]
