"""Full fine-tuning throughput of a mid-size composition on 1 and 2 GPUs, FSDP2 and ZeRO-3 (the Several issue, run 2).

    python bench/several_scaling.py --workdir /root/scaling --out OUT --tokenizer .carry/tokenizer

Four random-weight Llama experts (d2048, f8192, 16 layers, 16 heads / 4 KV heads, vocab 49152) composed E=4, k=2 as
traditional and btx (about 3.5B parameters each, bf16 on disk), then `moekit train` (`policy: full`, AdamW, bf16
mixed precision, no activation checkpointing) under `accelerate launch` with the example configs unchanged, on 1
process and on 2 with the same batch per GPU (weak scaling: `batch_size` is per process). The 1-GPU runs of the two
methods go side by side, one per GPU. Tokens/s is the trainer's logged throughput after the first logged interval;
MFU is model FLOPs (bench/launching.py) against the bf16 matmul peak measured in the same call.
Written to OUT: several_scaling.json and several_scaling.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose_memory import make_source  # noqa: E402
from launching import launch_train, log, steady_tokens_per_second, training_flops_per_token  # noqa: E402
from timing import environment, matmul_peak_tflops  # noqa: E402

from moekit import compose  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096)
TINY = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # --tiny: a CPU smoke run of the script itself (2 processes fall back to DDP)


def stdlib_text(path: Path, characters: int, skip: int = 0) -> Path:
    """Python standard library source as `text` rows (PSF licence), one module a row, about `characters` of it after
    the first `skip` characters' worth of modules (so two calls can give training and held-out text)."""
    import sysconfig

    rows, total = [], 0
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = source.read_text(errors="ignore")
        total += len(text)
        if total > skip:
            rows.append(json.dumps({"text": text}))
        if total >= skip + characters:
            break
    path.write_text("\n".join(rows) + "\n")
    return path


def run(name: str, composed: Path, data: Path, workdir: Path, processes: int, engine: str, args, gpus: str | None,
        port: int) -> dict:
    config = {"model": str(composed), "data": str(data), "stage": "router", "policy": "full",
              "block_size": args.block, "batch_size": args.batch, "max_steps": args.steps, "learning_rate": 1e-4,
              "gradient_checkpointing": False, "seed": 0}
    folder = workdir / "runs" / name
    shutil.rmtree(folder, ignore_errors=True)
    result = launch_train(config, folder, processes, "bf16", engine, port=port, gpus=gpus, timeout_s=args.run_timeout)
    shutil.rmtree(folder / "out", ignore_errors=True)  # 14 GB each; the log history is in the result
    result["name"] = name
    if "history" in result:
        result["tokens_per_second"] = steady_tokens_per_second(result["history"])
        losses = [entry["loss"] for entry in result["history"]]
        log(f"{name}: {result['tokens_per_second']} tokens/s, loss {losses[0]} -> {losses[-1]}, "
            f"peak {result['peak_gpu_memory_gib']} GiB, {result['wall_s']} s")
    else:
        log(f"{name}: FAILED\n{result['error'][-2000:]}")
    return result


def side_by_side(jobs: list[tuple]) -> list[dict]:
    results: list[dict] = [None] * len(jobs)

    def work(index: int, job: tuple) -> None:
        results[index] = run(*job)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| method | engine | GPUs | tokens/s | tokens/s per GPU | per GPU vs 1 GPU | MFU | "
             "peak memory per GPU (GiB) | loss first → last |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        if "tokens_per_second" not in row:
            lines.append(f"| {row['method']} | {row['engine']} | {row['processes']} | failed | | | | | |")
            continue
        losses = [entry["loss"] for entry in row["history"]]
        ratio = "" if row.get("scaling") is None else f"{row['scaling']:.2f}×"
        lines.append(f"| {row['method']} | {row['engine']} | {row['processes']} | {row['tokens_per_second']:,.0f} | "
                     f"{row['tokens_per_second'] / row['processes']:,.0f} | {ratio} | {row['mfu']:.1%} | "
                     f"{', '.join(str(v) for v in row['peak_gpu_memory_gib'].values())} | "
                     f"{losses[0]:.3f} → {losses[-1]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--engines", default="fsdp2,zero3")
    parser.add_argument("--methods", default="traditional,btx")
    parser.add_argument("--run-timeout", type=float, default=240)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, runnable on CPU (a check of the script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak_tflops(device, torch.bfloat16, size=8192 if device.type == "cuda" else 512)
    header = f"{environment(device)}; {torch.cuda.device_count()} GPUs; bf16 matmul peak {peak:.0f} TFLOP/s"
    log(header)
    shape = TINY if args.tiny else SHAPE
    sources = [make_source(args.workdir / f"expert{i}", shape, seed=i, dtype="bfloat16", device=device.type,
                           tokenizer=args.tokenizer) for i in range(4)]
    methods = args.methods.split(",")
    composed = {}
    for method in methods:
        composed[method] = compose({"method": method, "experts": [{"name": f"e{i}", "source": str(s)}
                                                                  for i, s in enumerate(sources)],
                                    "num_experts_per_tok": 2, "alpha": 0.01, "router_init": "random",
                                    "dtype": "bfloat16", "seed": 0},
                                   output=args.workdir / method, overwrite=True, progress=False)
    log(f"composed {', '.join(methods)}")
    data = stdlib_text(args.workdir / "stdlib.jsonl", characters=300_000 if args.tiny else 6_000_000)
    rows = []
    port = 29600
    for engine in args.engines.split(","):
        singles = side_by_side([(f"{m}-{engine}-1gpu", composed[m], data, args.workdir, 1, engine, args, str(i),
                                 port + i) for i, m in enumerate(methods)])
        port += 10
        for method, single in zip(methods, singles):
            rows.append({**single, "method": method, "engine": engine})
            double = run(f"{method}-{engine}-2gpu", composed[method], data, args.workdir, 2, engine, args, None, port)
            port += 1
            rows.append({**double, "method": method, "engine": engine})
            (args.out / "several_scaling.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    for row in rows:
        flops = training_flops_per_token(composed[row["method"]], args.block)
        row["flops_per_token"] = flops
        if row.get("tokens_per_second"):
            row["mfu"] = row["tokens_per_second"] / row["processes"] * flops / (peak * 1e12)
            one = next((r for r in rows if r["method"] == row["method"] and r["engine"] == row["engine"]
                        and r["processes"] == 1 and r.get("tokens_per_second")), None)
            row["scaling"] = (row["tokens_per_second"] / row["processes"] / one["tokens_per_second"]
                              if one and row["processes"] > 1 else None)
    (args.out / "several_scaling.json").write_text(json.dumps({"header": header, "peak_tflops": peak, "rows": rows},
                                                              indent=1))
    table = markdown(rows, header)
    (args.out / "several_scaling.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
