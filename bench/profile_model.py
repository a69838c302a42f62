"""Where a whole composed model's time goes on the GPU: training steps and decoding steps, kernel by kernel.

    python bench/profile_model.py [--methods btx traditional] [--shape issue|small|...]

Same model as bench/end_to_end.py (default its `issue` shape: Llama d2048, f8192, 4 layers, E=4, k=2, bf16). For each
method (and the dense model): the top CUDA kernels of one forward+backward at 8x1024 tokens, the step's wall time
beside the GPU's busy time (their gap is host time: launches and Python), and, for one decoding step at batch 1 with a
KV cache of 32 tokens, the number of kernel launches, the host-device synchronisations and the CPU time per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import synchronize  # noqa: E402
from end_to_end import QUICK, SHAPES, composed_model, dense_model  # noqa: E402

from moekit.runtime.base_model.cache_argument import CACHE_ARGUMENT  # noqa: E402

ACTIVITIES = {"cuda": [ProfilerActivity.CPU, ProfilerActivity.CUDA], "cpu": [ProfilerActivity.CPU]}
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def kernel_table(prof, rows: int) -> str:
    sort = "cuda_time_total" if any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()) else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)


def decode_step_counts(model, vocab: int, device) -> dict:
    """Launches, synchronisations and CPU ms of one cached decoding step (batch 1, 32 cached tokens)."""
    prompt = torch.randint(3, vocab, (1, 32), device=device)
    with torch.no_grad():
        cache = getattr(model(input_ids=prompt, use_cache=True), CACHE_ARGUMENT)
        step = torch.randint(3, vocab, (1, 1), device=device)
        arguments = {"input_ids": step, "use_cache": True, CACHE_ARGUMENT: cache}
        for _ in range(3):  # warm-up; every step runs on the same 32 cached tokens
            model(**arguments)
            cache.crop(-1)  # drop the step just added (a negative crop means the same in every 5.x)
        synchronize(device)
        with profile(activities=ACTIVITIES[device.type]) as prof:
            model(**arguments)
            synchronize(device)
        cache.crop(-1)
        start = time.perf_counter()
        for _ in range(20):
            model(**arguments)
            cache.crop(-1)
        synchronize(device)
    events = prof.events()
    launches = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")  # host-side: counted on a CPU run too
    kernels = [e for e in events if e.name in launches]
    syncs = Counter(e.name for e in events if e.name in SYNC_EVENTS)
    return dict(kernels=len(kernels), syncs=dict(syncs), step_ms=(time.perf_counter() - start) / 20 * 1e3,
                top_cpu=prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["btx", "traditional"])
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU (a smoke run)")
    parser.add_argument("--shape", default="issue", choices=sorted(SHAPES))
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick else "cuda")
    dtype, spec = (torch.float32, QUICK) if args.quick else (torch.bfloat16, SHAPES[args.shape])
    batch, length = spec["train_shape"]
    ids = torch.randint(3, spec["vocab"], (batch, length), device=device)
    for name in ["dense", *args.methods]:
        torch.manual_seed(0)
        model = dense_model(spec, device, dtype) if name == "dense" else composed_model(spec, name, device, dtype)
        model.train().requires_grad_(True)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            model(input_ids=ids, labels=ids).loss.backward()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) / 5 * 1e3
        with profile(activities=ACTIVITIES[device.type]) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
            synchronize(device)
        busy_ms = sum(e.device_time_total for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
        print(f"\n===== {name}: forward+backward {batch}x{length}: {wall_ms:.2f} ms a step unprofiled, GPU busy "
              f"{busy_ms:.2f} ms of it (kernels' own time, profiled step); top CUDA kernels", flush=True)
        print(kernel_table(prof, args.rows), flush=True)
        model.zero_grad(set_to_none=True)
        model.eval()
        counts = decode_step_counts(model, spec["vocab"], device)
        print(f"===== {name}: one decoding step (batch 1): {counts['kernels']} kernels, syncs {counts['syncs']}, "
              f"{counts['step_ms']:.2f} ms per step", flush=True)
        print(counts["top_cpu"], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
