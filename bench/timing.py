"""Timing helpers shared by the GPU benchmarks: median wall time of a callable (CUDA events on GPU), the bf16
matmul peak of the same run, relative error, and the environment line every table starts with."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.25, min_reps: int = 5,
            max_reps: int = 50) -> float:
    """Median milliseconds of `fn` after two warm-ups; as many repeats as fit in `budget_s` (within the bounds)."""
    for _ in range(2):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / once)))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin_s) * 1e3)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """Measured TFLOP/s of one large square matmul in this run: the ceiling the achieved figures are read against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, budget_s=0.5)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def environment(device: torch.device) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"{name}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")
