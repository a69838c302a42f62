"""`moekit train` router-only against the dense model of equal active parameters, both through a Trainer.

    python bench/train_speed.py --workdir /root/train_speed --out OUT --tokenizer .carry/tokenizer [--tiny | --small]
                                [--policy routers|full] [--compile]

The Speed issue's goal row: "`moekit train` router-only, btx: at least 0.8x the tokens/s of the dense model of
equal active parameters". bench/end_to_end.py times a bare AdamW step; this times what a user runs. Four random-weight
Llama experts of the issue's shape (d2048, f8192, 4 layers, 16 heads / 4 KV heads, vocab 49152, bf16 on disk) are
composed E=4, k=2 as btx (gate/up/down routed) and traditional; each is trained by `moekit train` (`stage:
router`, the default routers-only policy, bf16 mixed precision through `accelerate launch`, one process, 8 x 1024
tokens a step). The baseline is a Llama of the same shape with FFN width k x f (the dense model of equal active
parameters), every weight trained by transformers' `Trainer` with the same arguments (bf16, batch, AdamW, no
activation checkpointing) and the same throughput callback. Tokens/s is the logged throughput after the first
interval (which holds the warm-up); the runs go one after another in one call.
Written to OUT: train_speed.json and train_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose_memory import make_source  # noqa: E402
from launching import launch_train, log, steady_tokens_per_second  # noqa: E402
from several_scaling import stdlib_text  # noqa: E402
from timing import environment  # noqa: E402

from moekit import compose  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096)
# SmolLM2-135M's shape (the quality study's seed), where a step is bound by launches more than by matmuls
SMALL = dict(SHAPE, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3)
TINY = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TOP_K = 2

DENSE_SCRIPT = r'''
import json, sys
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from moekit.training.callbacks import ThroughputCallback
from moekit.data import token_blocks, load_data
from transformers import AutoTokenizer
settings = json.loads(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**settings["fields"], tie_word_embeddings=False)).to(torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(settings["tokenizer"])
blocks = token_blocks(load_data(settings["data"], required_columns=("text",)), tokenizer, settings["block"], "text")
if not isinstance(blocks, Dataset):
    blocks = Dataset.from_dict({"input_ids": blocks.tolist()})
def collate(rows):
    ids = torch.tensor([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids}
cuda = torch.cuda.is_available()
arguments = TrainingArguments(output_dir=settings["output"], max_steps=settings["steps"], learning_rate=1e-5,
    per_device_train_batch_size=settings["batch"], bf16=cuda, report_to="none", save_strategy="no",
    logging_steps=max(1, settings["steps"] // 5), disable_tqdm=True, lr_scheduler_type="cosine",
    warmup_steps=max(1, settings["steps"] // 10), weight_decay=0.0, use_cpu=not cuda, remove_unused_columns=False)
trainer = Trainer(model=model, args=arguments, train_dataset=blocks, data_collator=collate)
trainer.callback_handler.callbacks.insert(0, ThroughputCallback(settings["batch"] * settings["block"]))
trainer.train()
print("HISTORY " + json.dumps([e for e in trainer.state.log_history if "loss" in e]))
'''


def dense_equal_active(fields: dict, args, data: Path, folder: Path) -> dict:
    """The dense model of equal active parameters (FFN width k x f), every weight trained by a plain `Trainer`."""
    dense_fields = dict(fields, intermediate_size=TOP_K * fields["intermediate_size"])
    settings = {"fields": dense_fields, "tokenizer": str(args.tokenizer), "data": str(data), "block": args.block,
                "batch": args.batch, "steps": args.steps, "output": str(folder)}
    done = subprocess.run([sys.executable, "-c", DENSE_SCRIPT, json.dumps(settings)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=args.run_timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("HISTORY ")]
    if done.returncode != 0 or not lines:
        return {"name": "dense equal active, full", "error": (done.stdout + done.stderr)[-3000:]}
    history = json.loads(lines[-1].removeprefix("HISTORY "))
    return {"name": "dense equal active, full", "history": history,
            "tokens_per_second": steady_tokens_per_second(history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default="btx,traditional")
    parser.add_argument("--run-timeout", type=float, default=240)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, runnable on CPU (a check of the script)")
    parser.add_argument("--small", action="store_true", help="SmolLM2-135M's shape (d576, f1536, 30 layers)")
    parser.add_argument("--policy", default="routers", help="the freeze policy of the composed runs (routers, full)")
    parser.add_argument("--compile", action="store_true",
                        help="also run each method with `compile: true` (regional compilation of the decoder blocks)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = environment(device)
    log(header)
    fields = TINY if args.tiny else SMALL if args.small else SHAPE
    sources = [make_source(args.workdir / f"expert{i}", fields, seed=i, dtype="bfloat16", device=device.type,
                           tokenizer=args.tokenizer) for i in range(4)]
    data = stdlib_text(args.workdir / "stdlib.jsonl", characters=200_000 if args.tiny else 3_000_000)
    rows = [dense_equal_active(fields, args, data, args.workdir / "dense")]
    log(f"dense equal active: {rows[0].get('tokens_per_second')} tokens/s")
    for method in args.methods.split(","):
        composed = compose({"method": method, "experts": [{"name": f"e{i}", "source": str(s)}
                                                          for i, s in enumerate(sources)],
                            "num_experts_per_tok": TOP_K, "alpha": 0.01, "router_init": "random",
                            "dtype": "bfloat16", "seed": 0,
                            **({"router_layers": ["gate_proj", "up_proj", "down_proj"]} if method == "btx" else {})},
                           output=args.workdir / method, overwrite=True, progress=False)
        for compiled in (False, True) if args.compile else (False,):
            config = {"model": str(composed), "data": str(data), "stage": "router", "block_size": args.block,
                      "batch_size": args.batch, "max_steps": args.steps, "learning_rate": 1e-3, "seed": 0,
                      "gradient_checkpointing": False, "policy": args.policy, "compile": compiled}
            folder = args.workdir / "runs" / f"{method}-{'compiled' if compiled else 'eager'}"
            shutil.rmtree(folder, ignore_errors=True)
            result = launch_train(config, folder, 1, "bf16" if device.type == "cuda" else "no",
                                  timeout_s=args.run_timeout)
            what = "routers only" if args.policy == "routers" else f"policy {args.policy}"
            result["name"] = f"{method}, {what} (moekit train{', compile: true' if compiled else ''})"
            if "history" in result:
                result["tokens_per_second"] = steady_tokens_per_second(result["history"])
            log(f"{result['name']}: {result.get('tokens_per_second')} tokens/s" + (
                "" if "history" in result else f"\n{result.get('error', '')[-2000:]}"))
            rows.append(result)
    dense = rows[0].get("tokens_per_second")
    for row in rows[1:]:
        if dense and row.get("tokens_per_second"):
            row["vs_dense_equal_active"] = row["tokens_per_second"] / dense
    (args.out / "train_speed.json").write_text(json.dumps({"header": header, "fields": fields, "block": args.block,
                                                           "batch": args.batch, "steps": args.steps,
                                                           "policy": args.policy, "rows": rows},
                                                          indent=1))
    lines = [header, "", "| run | tokens/s | vs dense of equal active |", "|---|---:|---:|"]
    for row in rows:
        rate = row.get("tokens_per_second")
        ratio = row.get("vs_dense_equal_active")
        lines.append(f"| {row['name']} | {f'{rate:,.0f}' if rate else 'failed'} | "
                     f"{f'{ratio:.2f}×' if ratio else ''} |")
    table = "\n".join(lines) + "\n"
    (args.out / "train_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
