"""Convert sources once into safetensors folders kept in a cache, keyed by content: GGUF files (dequantised) and,
when the recipe allows it, pickle checkpoints (read with `weights_only=True`, which refuses arbitrary objects)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import SourceError
from .local_files import PICKLE_SUFFIXES, file_sha256


def default_cache_dir() -> Path:
    """MIXTUREKIT_CACHE, else ~/.cache/moekit."""
    return Path(os.environ.get("MIXTUREKIT_CACHE", Path.home() / ".cache" / "moekit"))


def _convert_once(kind: str, name: str, cache_dir: Path | None, write: Callable[[Path], None]) -> Path:
    """`cache/<kind>/<name>`, made by `write(staging)` on first use into a temporary folder renamed at the end, so a
    crash never leaves a half conversion and two processes converting at once both end with a complete one."""
    root = (cache_dir or default_cache_dir()) / kind
    target = root / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:  # another process converted the same source meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Return a folder with config, tokenizer and float32 safetensors of `gguf_path`, converting on first use."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401  (transformers needs both to read the file)
    except ImportError:
        raise SourceError(
            f"'{gguf_path}' is a GGUF file; reading it needs the `gguf` and `accelerate` packages: "
            "pip install gguf accelerate (moekit's `gguf` extra)"
        ) from None
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(staging: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
        # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the tensors are already
        # dequantised, so write them (tied copies once) and a config without the quantisation entry.
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(staging)

    try:
        return _convert_once("gguf", f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}", cache_dir, write)
    except SourceError:
        raise
    except Exception as error:
        raise SourceError(f"cannot convert GGUF file '{gguf_path}': {type(error).__name__}: {error}") from None


def convert_pickle(folder: Path, files: list[Path], cache_dir: Path | None = None) -> Path:
    """A safetensors copy of a pickle-only model folder (config and tokenizer files copied alongside)."""
    import torch
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        tensors: dict = {}
        for path in files:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise SourceError(f"'{path}' cannot be read with weights_only=True ({error}); it is refused") from None
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise SourceError(f"'{path}' is not a state dict of tensors; it is refused")
            tensors.update({k: v.contiguous().clone() for k, v in loaded.items()})
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        for item in folder.iterdir():
            if item.is_file() and item.suffix not in PICKLE_SUFFIXES:
                shutil.copyfile(item, staging / item.name)

    digest = hashlib.sha256()
    for path in files:
        digest.update(file_sha256(path).encode())
    return _convert_once("pickle", f"{folder.name}-{digest.hexdigest()[:16]}", cache_dir, write)
