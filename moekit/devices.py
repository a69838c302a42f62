"""Which device and dtype a model is loaded on when the user does not say: CUDA, then Apple's MPS, then the CPU.

One rule for every command that loads a model (`load`, `eval`, `compare`, `report`, `app`, `benchmark`), so their
numbers agree. The dtype follows what each device runs well: the checkpoint's own dtype on CUDA; float32 on the CPU
(bf16 matmuls are slow there and float16 ones partly unsupported); on MPS the stored float16 or float32, and bfloat16
only where macOS runs it (14 and newer), else float32 — transformers' advice for Apple silicon.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def mps_runs_bfloat16() -> bool:
    backend = getattr(torch.backends, "mps", None)
    check = getattr(backend, "is_macos_or_newer", None)
    return bool(check is not None and check(14, 0))


def default_device() -> str:
    """CUDA when there is a GPU, else MPS on Apple silicon, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def resolve_device(device: str | torch.device | None) -> str | torch.device:
    """`None` or "auto": `default_device()`; anything else as given."""
    return default_device() if device is None or device == "auto" else device


def default_dtype(device: str | torch.device, stored: torch.dtype | None = None) -> torch.dtype | str:
    """The dtype to load in on `device` when the user names none; `stored` is the checkpoint's dtype if known
    ("auto" on CUDA lets transformers read it)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.float32
    if kind == "mps":
        if stored in (torch.float16, torch.float32):
            return stored
        if stored == torch.bfloat16 and mps_runs_bfloat16():
            return torch.bfloat16
        return torch.float32
    return "auto"
