"""`moekit train` under `accelerate launch`: FSDP2 and DeepSpeed ZeRO-3 on every GPU there is, against one process
with the same global batch (the Several issue, run 1).

    python bench/accelerate_runs.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data DIR --workdir /tmp/acc --out OUT

SmolLM2-135M (from its GGUF) is branched into three experts by a short fine-tune on each domain of `--data` (the
token arrays `examples/btx_smollm2/prepare.py` writes), then composed: btx and traditional (the seed as a fourth
expert) and bts (the seed as hub). Router training (btx in fp32 and bf16, traditional), LoRA SFT (btx), LoRA DPO
(traditional) and stitch training (bts) run through `moekit train` with the example accelerate configs unchanged
(`examples/accelerate/fsdp2.yaml`, `deepspeed_zero3.yaml`) on all GPUs with `batch_size` 8 / GPUs, and on one
process with `batch_size` 8. The runs are compared, not timed, so several share the GPUs at once (`--parallel`).
Written to OUT: `accelerate_runs.json` (loss curves, checks) and `accelerate_runs.md` (the table).

What is compared: every run's loss curve against the one-process run of the same task and precision; the output each
run saved, loaded on one process, against that run's (logits on held-out text), and that it holds every tensor.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launching import launch_train, log  # noqa: E402

from moekit import compose  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the plain launches only


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
    """Held-in text for `moekit train`: documents of 512 tokens from each domain, decoded, interleaved."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    rows = []
    for index in range(documents):
        for tokens in data.values():
            start = index * 512
            rows.append({"text": tokenizer.decode(tokens[start:start + 512].tolist())})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def launch(name: str, config: dict, workdir: Path, distributed: str | None, precision: str, processes: int,
           port: int, gpus: str | None) -> dict:
    """One `moekit train` under `accelerate launch`; its loss curve and throughput (reused when done earlier)."""
    folder = workdir / "runs" / name.replace(":", "-")
    if (folder / "result.json").exists():  # done by an earlier call on this machine
        return json.loads((folder / "result.json").read_text())
    result = {"name": name, **launch_train(config, folder, processes, precision, distributed, port=port, gpus=gpus,
                                           timeout_s=400)}
    if result["returncode"] != 0:
        log(f"{name}: FAILED\n{result['error'][-1500:]}")
        return result
    history = result.pop("history")
    result["loss"] = [entry["loss"] for entry in history]
    result["routing_entropy"] = [entry.get("routing/entropy_mean") for entry in history]
    (folder / "result.json").write_text(json.dumps(result))
    log(f"{name}: {result['wall_s']} s, loss {result['loss'][:1]} -> {result['loss'][-1:]}")
    return result


def logits_of(folder: Path, base_model: Path | None, batch: torch.Tensor,
              round_to_bf16: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Logits (float32, one process) of a saved output: a full model, or a LoRA adapter on `base_model`; with
    `round_to_bf16`, every weight rounded to bfloat16 first (what a 16-bit save of the same weights would hold)."""
    import moekit  # noqa: F401
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
             "| run | launch | precision | processes | first loss | last loss | max loss diff vs 1 process | "
             "reloaded logits rel. diff vs 1 process | same, 1-process weights rounded to bf16 | top-1 agreement |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        task = run["name"].split(":")[0]
        if "loss" not in run:
            lines.append(f"| {task} | {run['distributed']} | {run['precision']} | {run['processes']} | failed | | | | | |")
            continue

        def number(key, spec=".4f"):
            value = run.get(key)
            return "" if value is None else format(value, spec)
        lines.append(f"| {task} | {run['distributed']} | {run['precision']} | {run['processes']} | "
                     f"{run['loss'][0]:.4f} | {run['loss'][-1]:.4f} | {number('loss_max_abs_diff_vs_plain')} | "
                     f"{number('logits_rel_diff_vs_plain', '.2e')} | "
                     f"{number('logits_rel_diff_vs_plain_rounded_bf16', '.2e')} | "
                     f"{number('top1_agreement_vs_plain', '.3f')} |")
    return "\n".join(lines) + "\n"


def write_preference_data(data: dict[str, np.ndarray], tokenizer_folder: Path, path: Path, pairs: int) -> Path:
    """DPO pairs from the domains: a 64-token prompt, its true 64-token continuation (chosen) and the continuation of
    another domain's text (rejected)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    domains = list(data.values())
    rows = []
    for index in range(pairs):
        own, other = domains[index % len(domains)], domains[(index + 1) % len(domains)]
        start = (index // len(domains)) * 128
        rows.append({"prompt": tokenizer.decode(own[start:start + 64].tolist()),
                     "chosen": tokenizer.decode(own[start + 64:start + 128].tolist()),
                     "rejected": tokenizer.decode(other[start + 64:start + 128].tolist())})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_all(jobs: list[tuple], parallel: int) -> list[dict]:
    """Launch the jobs `parallel` at a time (these runs are compared, not timed, so they may share the GPUs)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda job: launch(*job), jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder with data.npz (examples/btx_smollm2)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--expert-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated launches to run: plain,fsdp2,zero3")
    parser.add_argument("--tasks", default="", help="comma-separated, from: " + ", ".join(TASKS))
    parser.add_argument("--documents", type=int, default=200, help="512-token documents per domain to train on")
    parser.add_argument("--parallel", type=int, default=4, help="launches at a time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = max(1, torch.cuda.device_count())
    from moekit.sources import convert_gguf

    seed = convert_gguf(args.gguf, cache_dir=args.workdir / "gguf-cache")
    arrays = np.load(args.data / "data.npz")
    domains = json.loads((args.data / "data.json").read_text())["domains"]
    train = {d: arrays[f"{d}_train"] for d in domains}
    experts = branch_experts(seed, train, args.workdir, args.expert_steps)
    members = [{"name": n, "source": str(p)} for n, p in experts.items()]
    recipes = {"btx": {"method": "btx", "experts": members + [{"name": "seed", "source": str(seed)}],
                       "num_experts_per_tok": 2, "alpha": 0.01},
               "traditional": {"method": "traditional", "experts": members + [{"name": "seed", "source": str(seed)}],
                               "num_experts_per_tok": 2, "alpha": 0.01},
               "bts": {"method": "bts", "base": {"name": "seed", "source": str(seed)}, "experts": members}}
    composed = {}
    for method, recipe in recipes.items():
        composed[method] = args.workdir / "composed" / method
        if not (composed[method] / "config.json").exists():
            compose({**recipe, "router_init": "random", "dtype": "float32", "seed": 0}, output=composed[method],
                    overwrite=True, progress=False)
    log("composed btx, traditional and bts")
    text = write_text_data(train, seed, args.workdir / "train.jsonl", documents=args.documents)
    preferences = write_preference_data(train, seed, args.workdir / "preferences.jsonl", pairs=256)
    validation = {d: arrays[f"{d}_validation"] for d in domains}
    batch = torch.from_numpy(np.stack([v[:256].astype(np.int64) for v in validation.values()]))

    common = {"data": str(text), "block_size": 512, "max_steps": args.steps, "seed": 0}
    tasks = {
        "routers-btx": {**common, "model": str(composed["btx"]), "stage": "router", "learning_rate": 1e-3},
        "routers-traditional": {**common, "model": str(composed["traditional"]), "stage": "router",
                                "learning_rate": 1e-3},
        "lora-sft-btx": {**common, "model": str(composed["btx"]), "stage": "sft", "learning_rate": 2e-4},
        "lora-dpo-traditional": {**common, "model": str(composed["traditional"]), "stage": "dpo",
                                 "data": str(preferences), "learning_rate": 5e-5},
        "stitches-bts": {**common, "model": str(composed["bts"]), "stage": "router", "learning_rate": 1e-3},
    }
    base_models = {"lora-sft-btx": composed["btx"], "lora-dpo-traditional": composed["traditional"]}
    only = set(filter(None, args.only.split(",")))
    tasks_wanted = set(filter(None, args.tasks.split(",")))
    jobs = []
    port = 29800
    for task, precision in PLAN:
        if tasks_wanted and task not in tasks_wanted:
            continue
        # The reference is one process with the whole batch of 8; the sharded runs split it over the GPUs.
        for distributed, processes in ((None, 1), ("fsdp2", gpus), ("zero3", gpus)):
            if only and (distributed or "plain") not in only:
                continue
            config = {**tasks[task], "batch_size": 8 // processes}
            if task.startswith("lora") and distributed == "zero3":  # TRL forces reentrant checkpointing there
                config["gradient_checkpointing"] = False
            device = str(len(jobs) % gpus) if processes == 1 and DEVICE == "cuda" else None
            jobs.append((f"{task}:{distributed or 'plain'}:{precision}:{processes}", config, args.workdir,
                         distributed, precision, processes, port, device))
            port += 1
    runs = run_all(jobs, args.parallel)
    (args.out / "accelerate_runs.json").write_text(json.dumps(runs, indent=1))
    compare(runs, batch, base_models)
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    (args.out / "accelerate_runs.json").write_text(json.dumps({"gpus": gpus, "device": device, "runs": runs},
                                                              indent=1))
    (args.out / "accelerate_runs.md").write_text(markdown(runs, gpus, device))
    print(markdown(runs, gpus, device))


TASKS = ("routers-btx", "routers-traditional", "lora-sft-btx", "lora-dpo-traditional", "stitches-bts")
PLAN = [("routers-btx", "no"), ("routers-btx", "bf16"), ("routers-traditional", "bf16"), ("lora-sft-btx", "bf16"),
        ("lora-dpo-traditional", "bf16"), ("stitches-bts", "bf16")]


if __name__ == "__main__":
    main()
