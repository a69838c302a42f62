"""Where the traditional block's time goes on the GPU: a kernel profile, and timings of the pieces one by one.

    python bench/profile_block.py [--tokens 32 8192] [--experts 8] [--top-k 2]

Used to find what keeps the block above k x dense (docs/performance.md quotes it). Prints, per token count, the
top CUDA kernels of one forward+backward, and the time of routing, dispatch, each grouped matmul, the activation and
the combine step alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_baselines import dense_ffn, traditional_block  # noqa: E402
from timing import time_ms  # noqa: E402

from moekit.runtime.compute.experts import combine, dispatch, grouped_linear  # noqa: E402
from moekit.runtime.routed.routing import route  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 8192])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--f", type=int, default=8192)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        block = traditional_block(args.d, args.f, args.experts, args.top_k).to(dtype)
        dense = dense_ffn(args.d, args.f).to(dtype)
    experts = block.experts
    for count in args.tokens:
        tokens = torch.randn(count, args.d, device=device, dtype=dtype)
        upstream = torch.randn_like(tokens)
        print(f"\n=== {count} tokens, E{args.experts} k{args.top_k}, d{args.d} f{args.f}")
        weights, indices = route(block.gate(tokens), args.top_k)
        plan = dispatch(indices, weights, args.experts)
        sorted_inputs = tokens[plan.token_index]
        hidden = grouped_linear(sorted_inputs, experts.gate_up_proj, plan.groups, backend="grouped_mm")
        gate, up = hidden.chunk(2, dim=-1)
        activated = F.silu(gate) * up
        outputs = grouped_linear(activated, experts.down_proj, plan.groups, backend="grouped_mm")
        contiguous_up = experts.gate_up_proj.detach().transpose(-2, -1).contiguous()
        offsets = plan.groups.ends
        pieces = {
            "dense ffn fwd": lambda: dense(tokens),
            "router + route": lambda: route(block.gate(tokens), args.top_k),
            "dispatch": lambda: dispatch(indices, weights, args.experts),
            "gather tokens": lambda: tokens[plan.token_index],
            "grouped_mm up (transposed view)": lambda: grouped_linear(sorted_inputs, experts.gate_up_proj, plan.groups,
                                                                      backend="grouped_mm"),
            "grouped_mm up (contiguous [E,in,out])": lambda: F.grouped_mm(sorted_inputs, contiguous_up, offs=offsets),
            "loop up": lambda: grouped_linear(sorted_inputs, experts.gate_up_proj, plan.groups, backend="loop"),
            "activation": lambda: F.silu(gate) * up,
            "grouped_mm down": lambda: grouped_linear(activated, experts.down_proj, plan.groups, backend="grouped_mm"),
            "combine (gather + bmm)": lambda: combine(outputs, plan),
            "block fwd": lambda: block(tokens),
        }
        with torch.no_grad():
            for name, fn in pieces.items():
                print(f"  {name:42s} {time_ms(fn, device):8.3f} ms")
        tokens.requires_grad_(True)
        step = lambda: block(tokens).backward(upstream)  # noqa: E731
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        tokens.requires_grad_(False)


if __name__ == "__main__":
    main()
