"""`moekit.load`: a composed checkpoint as a ready model, refused with a clear message when the folder holds
something else. Plain `AutoModelForCausalLM.from_pretrained` loads one too (importing moekit registers it); this
adds the check before any weight is read, and the device and dtype every view of the library uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .devices import default_dtype, resolve_device
from .errors import SourceError
from .plan import DTYPES
from .runtime.assembly.config import require_composed
from .runtime.assembly.modeling import MixtureKitForCausalLM


def load(
    checkpoint: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
) -> MixtureKitForCausalLM:
    """The composed model of `checkpoint` (a folder or Hub id), in eval mode on `device`.

    `device`: default (None or "auto") CUDA, then MPS, then the CPU. `dtype`: default as `devices.default_dtype`
    says (float32 on the CPU, the stored dtype on CUDA, a dtype MPS runs on MPS). A dense or unreadable checkpoint is refused before any weight is read (a `SourceError` that
    names the model_type found).
    """
    require_composed(checkpoint)
    model = load_for_scoring(checkpoint, device=device, dtype=dtype)
    if not isinstance(model, MixtureKitForCausalLM):
        raise SourceError(f"'{checkpoint}' loaded as {type(model).__name__}, not MixtureKitForCausalLM")
    return model


def load_for_scoring(
    checkpoint: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
) -> Any:
    """Any causal LM of `checkpoint` (dense or composed), in eval mode on `device`: default CUDA, then MPS, then the
    CPU; `dtype` default as `devices.default_dtype` says, or "auto" or a name of
    a composition's dtypes (`plan.DTYPES`). What `load`, `evaluate` and `compare_to_merging` score with, so their
    numbers agree."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    if dtype is None:
        dtype = default_dtype(device, stored_dtype(checkpoint))
    elif isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            valid = ", ".join(["auto", *DTYPES])
            raise SourceError(f"unknown dtype '{dtype}' to load '{checkpoint}' in; valid: {valid}")
        dtype = DTYPES[dtype]
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()


def load_tokenizer(checkpoint: str | Path, why: str = "") -> Any:
    """The tokenizer stored with `checkpoint`, or a `SourceError` that says the folder has none usable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as failure:
        raise SourceError(f"'{checkpoint}' has no usable tokenizer{f' ({why})' if why else ''}: {failure}") \
            from failure


def load_processor(checkpoint: str | Path, why: str = "") -> Any:
    """The processor (image processor, image tokens, chat template) composed beside an image-text checkpoint, or a
    `SourceError` that says it is missing and where it comes from."""
    from transformers import AutoProcessor

    missing = (f"'{checkpoint}' has no processor{f' ({why})' if why else ''}: compose writes the sources' "
               "preprocessor_config.json and processor_config.json beside the checkpoint when the source folders "
               "hold them (save the processor with the expert, e.g. processor.save_pretrained(folder), and compose "
               "again, or copy those files into the checkpoint)")
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError, TypeError) as failure:
        raise SourceError(f"{missing}; loading it said: {failure}") from failure
    if getattr(processor, "image_processor", None) is None:
        raise SourceError(missing)
    return processor


def stored_dtype(checkpoint: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's config records (`dtype`, or the older `torch_dtype`), None when unknown."""
    from transformers import PretrainedConfig

    try:
        config = PretrainedConfig.get_config_dict(str(checkpoint))[0]
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None
