"""Eight 8B experts on one 8-GPU node (the Eight issue): compose them streamed, then train under FSDP2 on 1, 2, 4 and
8 GPUs with the same batch per GPU. One step per device call (a call may run 10 minutes; the node's disk and the
files on it last while the machine is held), every result appended to OUT/eight_gpus.json:

    python bench/eight_gpus.py compose --workdir /root/eight --out $OUT --method traditional   # sources + compose
    python bench/eight_gpus.py train --workdir /root/eight --out $OUT --method traditional \\
        --policy routers+attention --gpus 8                                                    # one launch
    python bench/eight_gpus.py report --out $OUT                                               # eight_gpus.md
    python bench/eight_gpus.py compose ... --tiny   # a CPU check of the script: tiny shape, one process

`compose` draws eight random Llama-3-8B-shaped experts (d4096, f14336, 32 layers, 32/8 heads, vocab 128256, bf16:
16 GB each) on the GPU, composes them (`top-2 of 8`) in a fresh process, recording wall time, the process's peak
host memory and the output's size, then deletes the sources: sources (128 GB) and one composition (94 GB for
traditional, 47B parameters) fit a 235 GB disk, two compositions and a trained copy do not. `train` runs
`moekit train` (router stage, `--policy`, bf16, activation checkpointing, `--batch` sequences of `--block` tokens per
GPU) under `accelerate launch` with examples/accelerate/fsdp2.yaml unchanged but for the process count, and records
tokens/s (the trainer's, after its first logged interval), tokens/s per GPU and its ratio to the 1-GPU run of the
same method and policy (goal: >= 0.85 at 8), MFU against the bf16 matmul peak measured in the same call, and the
peak memory of each GPU. A launch that runs out of memory is recorded as such ("does not fit"), not retried. The
trained model is written by the trainer (94 GB, rank 0) and deleted after the run; its log history is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose_memory import folder_bytes, make_source, run_in_subprocess  # noqa: E402
from launching import launch_train, log, steady_tokens_per_second, training_flops_per_token  # noqa: E402
from several_scaling import stdlib_text  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
RESULTS = "eight_gpus.json"
GOAL_SCALING = 0.85


def load_results(out: Path) -> dict:
    path = out / RESULTS
    return json.loads(path.read_text()) if path.is_file() else {"compose": [], "train": []}


def save_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")


def composed_folder(workdir: Path, method: str) -> Path:
    return workdir / f"composed-{method}"


def stdlib_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on the standard library's source (offline; the weights are random anyway): what
    `moekit train` tokenizes the training text with."""
    from moekit.demo.tiny_experts import train_tokenizer

    if not (folder / "tokenizer.json").is_file():
        text = stdlib_text(folder.parent / "tokenizer-text.jsonl", 2_000_000)
        rows = [json.loads(line)["text"] for line in text.read_text().splitlines()]
        train_tokenizer(rows, vocab_size, max_length=1 << 16).save_pretrained(folder)
    return folder


def compose_step(args: argparse.Namespace) -> dict:
    import torch

    shape = TINY if args.tiny else LLAMA3_8B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    tokenizer = args.tokenizer or stdlib_tokenizer(args.workdir / "tokenizer", 512 if args.tiny else 8192)
    sources = [make_source(args.workdir / f"expert{i}", shape, seed=i, dtype="bfloat16", device=device,
                           tokenizer=tokenizer) for i in range(args.experts)]
    made_s = time.perf_counter() - started
    log(f"{args.experts} sources in {made_s:.0f} s ({folder_bytes(args.workdir) / 1e9:.1f} GB)")
    output = composed_folder(args.workdir, args.method)
    recipe = {"method": args.method, "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)],
              "num_experts_per_tok": 2, "alpha": 0.01, "router_init": "random", "dtype": "bfloat16", "seed": 0}
    child = run_in_subprocess({"recipe": recipe, "output": str(output)})
    row = {"method": args.method, "experts": args.experts, "shape": "tiny" if args.tiny else "llama3-8b",
           "sources_s": round(made_s, 1), "compose_s": round(child["wall_s"], 1),
           "compose_peak_rss_gb": round(child["peak_rss"] / 1e9, 2), "output_bytes": folder_bytes(output)}
    if not args.keep_sources:
        for source in sources:
            shutil.rmtree(source)
    log(f"composed {args.method}: {row['compose_s']} s, peak host memory {row['compose_peak_rss_gb']} GB, "
        f"{row['output_bytes'] / 1e9:.1f} GB written")
    return row


def train_step(args: argparse.Namespace) -> dict:
    import torch

    from timing import matmul_peak_tflops

    composed = composed_folder(args.workdir, args.method)
    if not (composed / "config.json").is_file():
        raise SystemExit(f"no composition at {composed}: run `compose --method {args.method}` first on this machine")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak_tflops(device, torch.bfloat16, size=8192 if device.type == "cuda" else 256)
    data = stdlib_text(args.workdir / "stdlib.jsonl", characters=200_000 if args.tiny else 20_000_000)
    config = {"model": str(composed), "data": str(data), "stage": "router", "policy": args.policy,
              "block_size": args.block, "batch_size": args.batch, "max_steps": args.steps, "learning_rate": 1e-4,
              "gradient_checkpointing": True, "seed": 0}
    name = f"{args.method}-{args.policy}-{args.gpus}gpu"
    folder = args.workdir / "runs" / name
    shutil.rmtree(folder, ignore_errors=True)
    engine = None if device.type == "cpu" else "fsdp2"  # CPU: one plain process (the script's check)
    result = launch_train(config, folder, args.gpus, "bf16" if device.type == "cuda" else "no", engine,
                          port=29700 + args.gpus, timeout_s=args.run_timeout)
    shutil.rmtree(folder / "out", ignore_errors=True)  # the trained copy: 94 GB at the full shape
    row = {"method": args.method, "policy": args.policy, "gpus": args.gpus, "batch_per_gpu": args.batch,
           "block": args.block, "steps": args.steps, "peak_tflops": round(peak, 1), "wall_s": result["wall_s"],
           "peak_gpu_memory_gib": result["peak_gpu_memory_gib"]}
    if "history" not in result:
        text = result.get("error", "")
        row["outcome"] = "does not fit" if "OutOfMemoryError" in text or "out of memory" in text else "failed"
        row["error"] = text[-1500:]
        log(f"{name}: {row['outcome']}\n{text[-1500:]}")
        return row
    tokens = steady_tokens_per_second(result["history"])
    flops = training_flops_per_token(composed, args.block)
    losses = [entry["loss"] for entry in result["history"]]
    row.update(outcome="ran", tokens_per_second=tokens, tokens_per_second_per_gpu=tokens / args.gpus if tokens else None,
               flops_per_token=flops, mfu=(tokens / args.gpus * flops / (peak * 1e12)) if tokens else None,
               loss_first=losses[0], loss_last=losses[-1])
    log(f"{name}: {tokens} tokens/s, MFU {row['mfu']}, peak {row['peak_gpu_memory_gib']} GiB, {row['wall_s']} s")
    return row


def report(results: dict) -> str:
    lines = ["# Eight experts on one node", "", "| method | experts | sources (s) | compose (s) | compose peak host "
             "memory (GB) | written (GB) |", "|---|---:|---:|---:|---:|---:|"]
    for row in results["compose"]:
        lines.append(f"| {row['method']} ({row['shape']}) | {row['experts']} | {row['sources_s']} | {row['compose_s']} | "
                     f"{row['compose_peak_rss_gb']} | {row['output_bytes'] / 1e9:.1f} |")
    lines += ["", "| method | policy | GPUs | tokens/s | tokens/s per GPU | per GPU vs 1 GPU | MFU | peak memory per "
              "GPU (GiB) | loss first → last |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in sorted(results["train"], key=lambda r: (r["method"], r["policy"], r["gpus"])):
        memory = ", ".join(str(v) for v in row["peak_gpu_memory_gib"].values())
        if row["outcome"] != "ran" or not row.get("tokens_per_second"):
            lines.append(f"| {row['method']} | {row['policy']} | {row['gpus']} | {row['outcome']} | | | | {memory} | |")
            continue
        one = next((r for r in results["train"] if (r["method"], r["policy"], r["gpus"]) ==
                    (row["method"], row["policy"], 1) and r.get("tokens_per_second")), None)
        scaling = row["tokens_per_second_per_gpu"] / one["tokens_per_second_per_gpu"] if one else None
        scaled = "" if scaling is None else f"{scaling:.2f}×" + (" (goal met)" if row["gpus"] == 8 and
                                                                  scaling >= GOAL_SCALING else "")
        lines.append(f"| {row['method']} | {row['policy']} | {row['gpus']} | {row['tokens_per_second']:,.0f} | "
                     f"{row['tokens_per_second_per_gpu']:,.0f} | {scaled} | {row['mfu']:.1%} | {memory} | "
                     f"{row['loss_first']:.3f} → {row['loss_last']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["compose", "train", "report"])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", choices=["traditional", "btx"], default="traditional")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder copied into each source "
                        "(default: one trained on the standard library here)")
    parser.add_argument("--keep-sources", action="store_true", help="keep the sources after composing")
    parser.add_argument("--policy", default="routers+attention", choices=["routers", "routers+attention", "full"])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--run-timeout", type=float, default=540)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, runnable on CPU (a check of the script)")
    args = parser.parse_args(argv)
    results = load_results(args.out)
    if args.step != "report":
        if args.workdir is None:
            parser.error(f"{args.step} needs --workdir")
        args.workdir.mkdir(parents=True, exist_ok=True)
        row = compose_step(args) if args.step == "compose" else train_step(args)
        results["compose" if args.step == "compose" else "train"].append(row)
        save_results(args.out, results)
    table = report(results)
    (args.out / "eight_gpus.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
