"""Full fine-tuning of a composition that does not fit on one GPU, FSDP2 on 2 GPUs (the Several issue, run 3).

    python bench/several_bigger.py --workdir /root/bigger --out OUT --tokenizer .carry/tokenizer \
        --phases prepare,train,reload,one-gpu

Two random-weight experts of a Llama-3-8B shape (d4096, f14336, 32 layers, 32 heads / 8 KV heads; vocab 49152, the
tokenizer the run carries) composed `traditional` (top-2 of 2) by `moekit compose`: about 13.0B parameters,
208 GB of fp32 weights, gradients and AdamW state. `moekit train` (`policy: full`, bf16 mixed precision,
activation checkpointing) on the Python standard library's source, under `accelerate launch` with
examples/accelerate/fsdp2.yaml and only rank 0 reading the weights (`fsdp_cpu_ram_efficient_loading: true`).
Phases (each skipped when its result exists in the workdir, so a warm machine can take them over several calls):
`prepare` writes the experts and composes them (then deletes the experts); `train` runs on 2 GPUs; `reload` loads
the saved output on one GPU in a fresh process, checks it holds every tensor, and compares held-out loss before and
after; `one-gpu` runs the same training on one GPU, which must fail for memory. OUT gets several_bigger.json/.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose_memory import make_source  # noqa: E402
from launching import CONFIGS, launch_train, log, steady_tokens_per_second, training_flops_per_token  # noqa: E402
from several_scaling import stdlib_text  # noqa: E402
from timing import environment, matmul_peak_tflops  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def training_config(args, composed: Path, data: Path) -> dict:
    return {"model": str(composed), "data": str(data), "stage": "router", "policy": "full", "block_size": args.block,
            "batch_size": 1, "max_steps": args.steps, "learning_rate": 3e-4, "gradient_checkpointing": True,
            "seed": 0}


def efficient_fsdp2_config(workdir: Path) -> Path:
    """examples/accelerate/fsdp2.yaml with rank-0-only loading turned on (the one line this run changes)."""
    config = yaml.safe_load(CONFIGS["fsdp2"].read_text())
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = True
    path = workdir / "fsdp2-efficient-loading.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepare(args) -> tuple[Path, Path]:
    composed, data = args.workdir / "composed", args.workdir / "stdlib.jsonl"
    if not (composed / "config.json").exists():
        shape = TINY if args.tiny else SHAPE
        device = "cuda" if torch.cuda.is_available() else "cpu"
        started = time.perf_counter()
        sources = [make_source(args.workdir / f"expert{i}", shape, seed=i, dtype="bfloat16", device=device,
                               tokenizer=args.tokenizer) for i in range(2)]
        log(f"wrote 2 random experts in {time.perf_counter() - started:.0f} s")
        recipe = {"method": "traditional", "num_experts_per_tok": 2, "alpha": 0.01, "router_init": "random",
                  "dtype": "bfloat16", "seed": 0,
                  "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)]}
        (args.workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moekit.cli", "compose", str(args.workdir / "recipe.yaml"),
                        "--output", str(composed)], check=True)
        log(f"moekit compose: {time.perf_counter() - started:.0f} s")
        for source in sources:
            shutil.rmtree(source)
    if not data.exists():
        size = 300_000 if args.tiny else 3_000_000
        stdlib_text(data, characters=size)
        stdlib_text(args.workdir / "held_out.jsonl", characters=100_000, skip=size)
    return composed, data


def held_out_loss(folder: Path, data: Path, block: int) -> dict:
    """In a fresh process: load `folder` on one GPU, list missing/unexpected tensors, mean loss on 4 blocks of
    held-out text (standard library modules after the training ones)."""
    code = f"""
import json, torch, moekit
from transformers import AutoModelForCausalLM, AutoTokenizer
device = "cuda" if torch.cuda.is_available() else "cpu"
model, info = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.bfloat16, device_map=device,
                                                   output_loading_info=True)
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
rows = open({str(data.with_name("held_out.jsonl"))!r}).read().splitlines()
ids = tokenizer("".join(json.loads(r)["text"] for r in rows), return_tensors="pt").input_ids[0]
blocks = ids[: 4 * {block}].view(4, {block}).to(device)
with torch.no_grad():
    loss = model(input_ids=blocks, labels=blocks).loss.item()
print(json.dumps({{"loss": loss, "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                  "parameters": sum(p.numel() for p in model.parameters())}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--phases", default="prepare,train,reload,one-gpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, runnable on CPU (a check of the script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    results_file = args.workdir / "several_bigger.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))
        shutil.copy(results_file, args.out / "several_bigger.json")

    if "peak_tflops" not in results:
        results["header"] = f"{environment(device)}; {torch.cuda.device_count()} GPUs"
        results["peak_tflops"] = matmul_peak_tflops(device, torch.bfloat16, size=8192 if device.type == "cuda" else 512)
    composed, data = prepare(args)
    results["composed_gb_on_disk"] = round(sum(f.stat().st_size for f in composed.glob("*.safetensors")) / 1e9, 1)
    flops = training_flops_per_token(composed, args.block)
    config = training_config(args, composed, data)
    efficient = efficient_fsdp2_config(args.workdir)
    save()
    if "train" in phases and "train" not in results:
        folder = args.workdir / "train-2gpu"
        shutil.rmtree(folder, ignore_errors=True)
        run = launch_train(config, folder, 2, "bf16", efficient, port=29700,
                           timeout_s=480)
        run["tokens_per_second"] = steady_tokens_per_second(run.get("history", []))
        if run["tokens_per_second"]:
            run["mfu"] = run["tokens_per_second"] / 2 * flops / (results["peak_tflops"] * 1e12)
        results["train"] = run
        save()
        log(f"2 GPUs: {json.dumps({k: v for k, v in run.items() if k != 'history'})[:3000]}")
    if "reload" in phases and "reload" not in results and results.get("train", {}).get("output"):
        results["reload"] = {"before": held_out_loss(composed, data, args.block),
                             "after": held_out_loss(Path(results["train"]["output"]), data, args.block)}
        save()
        log(f"reload: {results['reload']}")
        shutil.rmtree(results["train"]["output"], ignore_errors=True)  # 52 GB of fp32
    if "one-gpu" in phases and "one_gpu" not in results:
        folder = args.workdir / "train-1gpu"
        shutil.rmtree(folder, ignore_errors=True)
        run = launch_train(config, folder, 1, "bf16", efficient, port=29710,
                           timeout_s=300)
        text = run.get("error", "")
        run["out_of_memory"] = "out of memory" in text.lower() or "OutOfMemoryError" in text
        run["error_line"] = next((line for line in text.splitlines()[::-1] if "out of memory" in line.lower()), "")
        results["one_gpu"] = {k: v for k, v in run.items() if k != "history"}
        save()
        shutil.rmtree(folder, ignore_errors=True)
        log(f"1 GPU: out of memory {run['out_of_memory']}: {run['error_line'][:400]}")
    (args.out / "several_bigger.md").write_text(markdown(results, flops))
    print(markdown(results, flops))


def markdown(results: dict, flops: float) -> str:
    lines = [results.get("header", ""), "", f"composed checkpoint on disk: {results.get('composed_gb_on_disk')} GB "
             f"(bf16); model FLOPs per training token {flops / 1e9:.1f} GFLOP", ""]
    train = results.get("train")
    if train:
        losses = [entry["loss"] for entry in train.get("history", [])]
        lines += [f"- 2 GPUs (FSDP2): return code {train['returncode']}, wall {train['wall_s']} s, peak memory per GPU "
                  f"{train['peak_gpu_memory_gib']} GiB, tokens/s {train.get('tokens_per_second')}, "
                  f"MFU {train.get('mfu', 0):.1%}, loss {losses[:1]} → {losses[-1:]}"]
    reload = results.get("reload")
    if reload:
        lines += [f"- reloaded on one GPU: before training {reload['before']}, after {reload['after']}"]
    one = results.get("one_gpu")
    if one:
        lines += [f"- 1 GPU: return code {one['returncode']}, out of memory: {one['out_of_memory']}, peak "
                  f"{one['peak_gpu_memory_gib']} GiB: `{one['error_line'][:300]}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
