"""Checkpoint tensor names as `transformers` reads them: it renames some legacy names on load (GPT-NeoX's
`embed_out` -> `lm_head`, old `gamma`/`beta` norms...) and writes them back on save, so we apply the same renames."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import CompatibilityError


def checkpoint_key_renamer(dense_model: nn.Module) -> Callable[[str], str]:
    """A function from a source checkpoint's tensor name to the model's parameter name."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers release without conversion mappings: names are used as stored
        return lambda key: key
    transforms = get_model_conversion_mapping(dense_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        renamed, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            raise CompatibilityError(
                f"tensor '{key}' is stored in a layout that transformers converts on load ({converter}); "
                "re-save the model with this transformers version (from_pretrained + save_pretrained) first"
            )
        return renamed

    return rename
