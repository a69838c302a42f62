"""BTS forward cost against its floor: the hub and every expert stream run densely, one after another.

The floor is the hub's dense forward plus each expert's base-model forward (its blocks without the LM head, which
BTS never runs for an expert). BTS adds each stream's capture pass (embeddings, masks, rotary: no block runs) and the
stitches. Prints one table of ratios measured in one run.

    python bench/bts_overhead.py [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit import MixtureKitConfig, MixtureKitForCausalLM  # noqa: E402


def _time(fn, repeats: int, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    print(f"device {args.device}, {args.dtype}, torch {torch.__version__}, llama d{args.hidden} x {args.layers} blocks")
    print("| experts | stitches | tokens | floor ms (hub + experts' blocks) | bts ms | bts / floor |")
    print("|--------:|---------:|-------:|----------------------------:|-------:|------------:|")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(args.device, dtype).eval()
    for experts in (1, 2, 4):
        for freq in (1, 4):
            composed_config = MixtureKitConfig(
                text_config=config, method="bts", expert_names=[f"e{i}" for i in range(experts)],
                expert_configs=[config] * experts,
                stitch_layers_index=list(range(freq - 1, args.layers, freq)),
            )
            model = MixtureKitForCausalLM(composed_config).to(args.device, dtype).eval()
            for batch, length in ((1, 32), (4, 512)):
                tokens = torch.randint(0, 8000, (batch, length), device=args.device)
                with torch.no_grad():
                    hub_ms = _time(lambda: dense(input_ids=tokens, use_cache=False), args.repeats, args.device)
                    stream_ms = _time(lambda: dense.model(input_ids=tokens, use_cache=False), args.repeats, args.device)
                    bts_ms = _time(lambda: model(input_ids=tokens, use_cache=False), args.repeats, args.device)
                floor = hub_ms + experts * stream_ms
                print(f"| {experts} | every {freq} | {batch}x{length} | {floor * 1e3:.1f} | {bts_ms * 1e3:.1f} | "
                      f"{bts_ms / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
