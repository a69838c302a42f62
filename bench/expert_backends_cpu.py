"""CPU (fp32) timing of the expert backends, so the CPU default is chosen by measurement.

    python bench/expert_backends_cpu.py

Forward + backward of one grouped linear (the traditional block's up projection) per shape, loop vs grouped_mm,
after checking they agree. Prints a table of times and the ratio loop / grouped_mm (> 1: grouped_mm is faster).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit.runtime.compute.experts import grouped_linear  # noqa: E402

SHAPES = ((4, 512, 1536, 2048), (8, 512, 1536, 512), (8, 1024, 2816, 1024), (32, 256, 768, 512))


def _time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print("| experts | d | f | tokens | loop ms | grouped_mm ms | loop / grouped_mm |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for experts, d, f, tokens in SHAPES:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(tokens, d, generator=generator, requires_grad=True)
        weight = torch.randn(experts, f, d, generator=generator, requires_grad=True)
        counts = torch.bincount(torch.randint(0, experts, (tokens,), generator=generator), minlength=experts).tolist()
        upstream = torch.randn(tokens, f, generator=generator)
        reference = grouped_linear(inputs, weight, counts, backend="loop")
        candidate = grouped_linear(inputs, weight, counts, backend="grouped_mm")
        torch.testing.assert_close(candidate, reference, atol=1e-3, rtol=1e-4)  # never time a wrong backend

        def step(backend: str) -> None:
            (grouped_linear(inputs, weight, counts, backend=backend) * upstream).sum().backward()

        loop, grouped = _time(lambda: step("loop")), _time(lambda: step("grouped_mm"))
        print(f"| {experts} | {d} | {f} | {tokens} | {loop * 1e3:.1f} | {grouped * 1e3:.1f} | {loop / grouped:.2f} |")


if __name__ == "__main__":
    main()
