"""Facts about local weight files that several places need: which suffixes are pickles, and a file's sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Pickled PyTorch checkpoints: read only where the recipe allows it (with `weights_only=True`), never copied into a
# conversion beside its safetensors, never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def file_sha256(path: Path) -> str:
    """The file's sha256 as hex, read in 4 MiB blocks (a weight file is never held whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()
