"""The decoding kernel's bandwidth against cuBLAS reading the same bytes (GPU; one call, a few seconds).

    python bench/decode_kernel.py [--json out.json]

A static-cache decoding step runs as a CUDA graph, so what separates a composed model from the dense one there is GPU
time, and most of it is `moekit::chosen_experts_matvec` reading the k chosen experts' weights. For each routed
projection of the benchmark shapes (one token, top-2: btx's gate and up without the mix, the down projection with it,
traditional's fused gate+up), this times the kernel under several tilings (output columns per program x inner elements
per loop step) and, beside it, cuBLAS's matvec over a dense weight of the same bytes (`F.linear` of one row by a
`[k*out, in]` matrix): GPU time of 20 calls captured in one CUDA graph, median of the replays. Rows: `round three`
(128 inner elements, the tiling before 2026-11-30's round five), `now` (`_tile`, what the library runs), and fixed
inner sizes with the library's column rule. The largest difference between a tiling's output and round three's is
printed (float32 sums in another order may differ in the last bf16 bit); it is reported, not asserted: the CUDA
kernel tests hold the library's tiling to the float64 reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import environment  # noqa: E402

from moekit.runtime.compute import chosen_experts_kernel as kernel  # noqa: E402

# (label, experts, out_features, in_features, mix): one token, top-2
CASES = [
    ("issue gate/up (btx)", 4, 8192, 2048, False),
    ("issue down", 4, 2048, 8192, True),
    ("issue gate+up (traditional)", 4, 16384, 2048, False),
    ("e16 down", 16, 2048, 8192, True),
    ("wide gate/up (btx)", 4, 14336, 4096, False),
    ("wide down", 4, 4096, 14336, True),
]
TOP_K = 2
CALLS = 20


def graph_time_us(fn, replays: int = 30) -> float:
    """Median GPU microseconds of one `fn` call, from CALLS calls captured in a CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def tilings(library_tile):
    def fixed(inner):
        def rule(rows, out_features, in_features):
            return library_tile(rows, out_features, in_features)[0], inner
        return rule

    return {"round three": fixed(128), "now": library_tile,
            **{f"inner {inner}": fixed(inner) for inner in (256, 512, 1024, 2048)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available() or kernel._LAUNCH is None:
        raise SystemExit("needs CUDA and Triton")
    device = torch.device("cuda")
    print(environment(device), flush=True)
    library_tile = kernel._tile
    rules = tilings(library_tile)
    results = {"environment": environment(device), "calls_per_graph": CALLS, "cases": []}
    print("| projection | bytes read MB | cuBLAS us (GB/s) | " + " | ".join(rules) + " | tile now | max diff |")
    print("|---|---:|---:|" + "---:|" * len(rules) + "---|---:|")
    for label, experts, out_features, in_features, mix in CASES:
        torch.manual_seed(0)
        weight = (0.02 * torch.randn(experts, out_features, in_features, device=device)).bfloat16()
        chosen = torch.tensor([[experts - 1, 1]], device=device)
        inputs = torch.randn(TOP_K if mix else 1, in_features, device=device).bfloat16()
        weights = torch.tensor([[0.7, 0.3]], device=device) if mix else None
        dense = (0.02 * torch.randn(TOP_K * out_features, in_features, device=device)).bfloat16()
        row = torch.randn(1, in_features, device=device).bfloat16()
        nbytes = TOP_K * out_features * in_features * 2
        cublas = graph_time_us(lambda: F.linear(row, dense))
        case = {"projection": label, "experts": experts, "out_features": out_features, "in_features": in_features,
                "mix": mix, "bytes": nbytes, "cublas_us": cublas, "tilings": {}}
        outputs = {}
        for name, rule in rules.items():
            kernel._tile = rule
            try:
                outputs[name] = kernel.chosen_experts_matvec(inputs, weight, None, chosen, weights)
                case["tilings"][name] = graph_time_us(
                    lambda: kernel.chosen_experts_matvec(inputs, weight, None, chosen, weights))
            finally:
                kernel._tile = library_tile
        reference = outputs["round three"].float()
        case["max_difference"] = max((o.float() - reference).abs().max().item() for o in outputs.values())
        case["tile_now"] = list(library_tile(1 if mix else TOP_K, out_features, in_features))
        results["cases"].append(case)
        cells = " | ".join(f"{us:.1f} ({nbytes / us / 1e3:.0f})" for us in case["tilings"].values())
        print(f"| {label} | {nbytes / 1e6:.1f} | {cublas:.1f} ({nbytes / cublas / 1e3:.0f}) | {cells} | "
              f"{case['tile_now']} | {case['max_difference']:.2g} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
