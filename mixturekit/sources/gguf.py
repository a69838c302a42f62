"""Dequantise a GGUF file once into a safetensors folder kept in a cache, keyed by the file's content."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import SourceError


def default_cache_dir() -> Path:
    """MIXTUREKIT_CACHE, else ~/.cache/mixturekit."""
    return Path(os.environ.get("MIXTUREKIT_CACHE", Path.home() / ".cache" / "mixturekit"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Return a folder with config, tokenizer and float32 safetensors of `gguf_path`, converting on first use."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise SourceError(
            f"'{gguf_path}' is a GGUF file; reading it needs the `gguf` package: pip install 'mixturekit[gguf]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = (cache_dir or default_cache_dir()) / "gguf"
    target = root / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(staging)
        del model
        try:
            staging.rename(target)
        except OSError:  # another process converted the same file meanwhile
            if not (target / "config.json").is_file():
                raise
    except SourceError:
        raise
    except Exception as error:
        raise SourceError(f"cannot convert GGUF file '{gguf_path}': {type(error).__name__}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
