"""`mixturekit train` under `accelerate launch` on a GPU: plain, FSDP2 and DeepSpeed ZeRO-3, same configs, same batch.

    python bench/accelerate_runs.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data DIR --workdir /tmp/acc --out OUT

SmolLM2-135M (from its GGUF) is branched into three experts by a short fine-tune on each domain of `--data` (the
token arrays `examples/btx_smollm2/prepare.py` writes), then composed (btx and traditional, with the seed as a fourth
expert). Router training and LoRA SFT then run through `mixturekit train` with the example accelerate configs
unchanged (`examples/accelerate/fsdp2.yaml`, `deepspeed_zero3.yaml`), with `--num_processes` set to the GPUs there
are. Written to OUT: `accelerate_runs.json` (loss curves, throughput, checks) and `accelerate_runs.md` (the tables).

What is compared: every run's loss curve against the plain run of the same precision; the checkpoint each run saved,
loaded on one process, against the plain run's (logits on held-out text), and that it holds every tensor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixturekit import compose  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the plain launches only
CONFIGS = {"fsdp2": ROOT / "examples/accelerate/fsdp2.yaml", "zero3": ROOT / "examples/accelerate/deepspeed_zero3.yaml"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def branch_experts(seed: Path, data: dict[str, np.ndarray], workdir: Path, steps: int) -> dict[str, Path]:
    """One short full fine-tune of the seed per domain: experts that differ, so routing has something to learn."""
    from transformers import AutoModelForCausalLM

    experts = {}
    for name, tokens in data.items():
        folder = workdir / "experts" / name
        if not (folder / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32).to(DEVICE).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
            blocks = torch.from_numpy(tokens[: len(tokens) // 512 * 512].astype(np.int64)).view(-1, 512)
            generator = torch.Generator().manual_seed(0)
            for _ in range(steps):
                batch = blocks[torch.randint(0, len(blocks), (16,), generator=generator)].to(DEVICE)
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.save_pretrained(folder)
            for path in seed.iterdir():
                if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    (folder / path.name).write_bytes(path.read_bytes())
            log(f"expert {name}: last loss {loss.item():.3f}")
        experts[name] = folder
    return experts


def write_text_data(data: dict[str, np.ndarray], tokenizer_folder: Path, path: Path, documents: int) -> Path:
    """Held-in text for `mixturekit train`: documents of 512 tokens from each domain, decoded, interleaved."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    rows = []
    for index in range(documents):
        for tokens in data.values():
            start = index * 512
            rows.append({"text": tokenizer.decode(tokens[start:start + 512].tolist())})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def launch(name: str, config: dict, workdir: Path, distributed: str | None, precision: str, gpus: int) -> dict:
    """One `mixturekit train` under `accelerate launch`; its log history and throughput."""
    folder = workdir / "runs" / name.replace(":", "-")
    if (folder / "result.json").exists():  # done by an earlier call on this machine
        return json.loads((folder / "result.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.yaml").write_text(yaml.safe_dump({**config, "output": str(folder / "out")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
               str(gpus), "--mixed_precision", precision, "--dynamo_backend", "no"]
    if distributed:
        command += ["--config_file", str(CONFIGS[distributed])]
    elif gpus > 1:
        command += ["--multi_gpu"]
    command += ["-m", "mixturekit.cli", "train", str(folder / "train.yaml")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cuda"})
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    result = {"name": name, "distributed": distributed or "plain", "precision": precision, "processes": gpus,
              "returncode": done.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if done.returncode != 0:
        result["error"] = (done.stdout + done.stderr)[-4000:]
        log(f"{name}: FAILED\n{result['error'][-1500:]}")
        return result
    states = sorted((folder / "out").rglob("trainer_state.json"), key=lambda p: p.stat().st_mtime)
    history = json.loads(states[-1].read_text())["log_history"] if states else []
    result["loss"] = [entry["loss"] for entry in history if "loss" in entry]
    result["routing_entropy"] = [entry.get("routing/entropy_mean") for entry in history if "loss" in entry]
    # The trainer prints its run summary after the last checkpoint, so it is read from the log.
    summary = re.findall(r"'train_runtime': '?([0-9.]+)'?, 'train_samples_per_second': '?([0-9.]+)", done.stdout)
    if summary:
        result["train_runtime_s"], result["samples_per_second"] = (float(x) for x in summary[-1])
    else:
        result["samples_per_second"] = None
    result["output"] = str(folder / "out")
    (folder / "result.json").write_text(json.dumps(result))
    log(f"{name}: {result['wall_s']} s, loss {result['loss'][:1]} -> {result['loss'][-1:]}, "
        f"{result['samples_per_second']} samples/s")
    return result


def logits_of(folder: Path, base_model: Path | None, batch: torch.Tensor,
              round_to_bf16: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Logits (float32, one process) of a saved output: a full model, or a LoRA adapter on `base_model`; with
    `round_to_bf16`, every weight rounded to bfloat16 first (what a 16-bit save of the same weights would hold)."""
    import mixturekit  # noqa: F401
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    messages: list[str] = []
    handler = _Collect(messages)
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        if (folder / "adapter_config.json").exists():
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    if round_to_bf16:
        model = model.to(torch.bfloat16).float()
    model = model.to(DEVICE).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.to(DEVICE)).logits.float().cpu()
    return logits, [m for m in messages if any(w in m.lower() for w in ("missing", "unexpected", "newly initialized"))]


def _stored_dtype(path: Path) -> str:
    """The dtype of the first tensor in a safetensors file, from its header."""
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return next(value["dtype"] for key, value in header.items() if key != "__metadata__")


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__()
        self.messages = messages

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def compare(runs: list[dict], batch: torch.Tensor, base_models: dict[str, Path]) -> None:
    """Each run against the plain run of the same task and precision: loss curve and reloaded logits."""
    references = {}
    for run in runs:
        task = run["name"].split(":")[0]
        if "output" not in run:
            continue
        run["logits"], run["load_warnings"] = logits_of(Path(run["output"]), base_models.get(task), batch)
        key = (task, run["precision"])
        if run["distributed"] == "plain":
            references[key] = run
    for run in runs:
        reference = references.get((run["name"].split(":")[0], run["precision"]))
        if "logits" not in run or reference is None or reference is run:
            continue
        a, b = np.array(run["loss"]), np.array(reference["loss"])
        run["loss_max_abs_diff_vs_plain"] = float(np.abs(a - b).max()) if len(a) == len(b) else None
        difference = (run["logits"] - reference["logits"]).abs()
        run["logits_max_abs_diff_vs_plain"] = float(difference.max())
        run["logits_rel_diff_vs_plain"] = float(difference.norm() / reference["logits"].norm())
        run["top1_agreement_vs_plain"] = float((run["logits"].argmax(-1) == reference["logits"].argmax(-1))
                                               .float().mean())
        saved = next(Path(run["output"]).glob("*.safetensors"), None)
        full_model = not (Path(run["output"]) / "adapter_config.json").exists()
        if full_model and saved is not None and _stored_dtype(saved) == "BF16":
            # The output holds bf16 weights: compare with the plain output's weights rounded the same way too.
            rounded, _ = logits_of(Path(reference["output"]), None, batch, round_to_bf16=True)
            run["logits_rel_diff_vs_plain_rounded_bf16"] = float((run["logits"] - rounded).norm() / rounded.norm())
    for run in runs:
        run.pop("logits", None)


def markdown(runs: list[dict], gpus: int, device: str) -> str:
    lines = [f"{gpus} x {device}; torch {torch.__version__}", "",
             "| run | launch | precision | processes | first loss | last loss | max loss diff vs plain | "
             "reloaded logits rel. diff vs plain | same, plain rounded to bf16 | top-1 agreement | samples/s | "
             "samples/s per GPU |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        if "loss" not in run:
            lines.append(f"| {run['name']} | {run['distributed']} | {run['precision']} | {run['processes']} | "
                         "failed | | | | | | | |")
            continue
        def number(key, spec=".4f"):
            value = run.get(key)
            return "" if value is None else format(value, spec)
        per_gpu = (run["samples_per_second"] or 0) / run["processes"]
        lines.append(f"| {run['name']} | {run['distributed']} | {run['precision']} | {run['processes']} | "
                     f"{run['loss'][0]:.4f} | {run['loss'][-1]:.4f} | {number('loss_max_abs_diff_vs_plain')} | "
                     f"{number('logits_rel_diff_vs_plain', '.2e')} | "
                     f"{number('logits_rel_diff_vs_plain_rounded_bf16', '.2e')} | {number('top1_agreement_vs_plain', '.3f')} | "
                     f"{number('samples_per_second', '.1f')} | {per_gpu:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with data.npz (examples/btx_smollm2)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--expert-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated launches to run: plain,fsdp2,zero3")
    parser.add_argument("--tasks", default="", help="comma-separated: routers-btx,routers-traditional,lora-sft-btx")
    parser.add_argument("--documents", type=int, default=200, help="512-token documents per domain to train on")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = max(1, torch.cuda.device_count())
    from mixturekit.sources import convert_gguf

    seed = convert_gguf(args.gguf, cache_dir=args.workdir / "gguf-cache")
    arrays = np.load(args.data / "data.npz")
    domains = json.loads((args.data / "data.json").read_text())["domains"]
    train = {d: arrays[f"{d}_train"] for d in domains}
    experts = branch_experts(seed, train, args.workdir, args.expert_steps)
    members = [{"name": n, "source": str(p)} for n, p in experts.items()] + [{"name": "seed", "source": str(seed)}]
    composed = {}
    for method in ("btx", "traditional"):
        composed[method] = compose({"method": method, "experts": members, "num_experts_per_tok": 2, "alpha": 0.01,
                                    "router_init": "random", "dtype": "float32", "seed": 0},
                                   output=args.workdir / "composed" / method, overwrite=True, progress=False)
    log("composed btx and traditional")
    text = write_text_data(train, seed, args.workdir / "train.jsonl", documents=args.documents)
    validation = {d: arrays[f"{d}_validation"] for d in domains}
    batch = torch.from_numpy(np.stack([v[:256].astype(np.int64) for v in validation.values()]))

    common = {"data": str(text), "block_size": 512, "max_steps": args.steps, "seed": 0}
    tasks = {
        "routers-btx": {**common, "model": str(composed["btx"]), "stage": "router", "batch_size": 8,
                        "learning_rate": 1e-3, "save_steps": args.steps},
        "routers-traditional": {**common, "model": str(composed["traditional"]), "stage": "router", "batch_size": 8,
                                "learning_rate": 1e-3, "save_steps": args.steps},
        "lora-sft-btx": {**common, "model": str(composed["btx"]), "stage": "sft", "batch_size": 8,
                         "learning_rate": 2e-4, "save_steps": args.steps},
    }
    plan = [("routers-btx", None, "no"), ("routers-btx", "fsdp2", "no"), ("routers-btx", "zero3", "no"),
            ("routers-btx", None, "bf16"), ("routers-btx", "fsdp2", "bf16"), ("routers-btx", "zero3", "bf16"),
            ("routers-traditional", None, "bf16"), ("routers-traditional", "fsdp2", "bf16"),
            ("routers-traditional", "zero3", "bf16"),
            ("lora-sft-btx", None, "bf16"), ("lora-sft-btx", "fsdp2", "bf16"), ("lora-sft-btx", "zero3", "bf16")]
    only = set(filter(None, args.only.split(",")))
    tasks_wanted = set(filter(None, args.tasks.split(",")))
    runs = []
    for task, distributed, precision in plan:
        if only and (distributed or "plain") not in only or tasks_wanted and task not in tasks_wanted:
            continue
        # `batch_size` is per process: the global batch stays 8 at any number of GPUs.
        config = {**tasks[task], "batch_size": max(1, 8 // gpus)}
        if task.startswith("lora") and distributed == "zero3":  # TRL forces reentrant checkpointing there
            config["gradient_checkpointing"] = False
        runs.append(launch(f"{task}:{distributed or 'plain'}:{precision}", config, args.workdir, distributed,
                           precision, gpus))
        (args.out / "accelerate_runs.json").write_text(json.dumps(runs, indent=1))
    compare(runs, batch, {"lora-sft-btx": composed["btx"]})
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    (args.out / "accelerate_runs.json").write_text(json.dumps({"gpus": gpus, "device": device, "runs": runs},
                                                              indent=1))
    (args.out / "accelerate_runs.md").write_text(markdown(runs, gpus, device))
    print(markdown(runs, gpus, device))


if __name__ == "__main__":
    main()
