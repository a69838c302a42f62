"""`moekit train` under `accelerate launch` for the several-GPU benchmarks: one launch with its log history, wall
time and peak memory per GPU (read from nvidia-smi while it runs), and the model FLOPs of a training token for MFU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"fsdp2": ROOT / "examples/accelerate/fsdp2.yaml", "zero3": ROOT / "examples/accelerate/deepspeed_zero3.yaml"}
# NVLink multicast stays off on shared hosts, also in the processes accelerate starts.
SAFE_NCCL = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class GpuMemoryPeak:
    """The largest memory.used of each GPU (MiB) while the block runs, sampled from nvidia-smi."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak, self._stop = interval_s, {}, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    index, used = (int(x) for x in line.split(","))
                    self.peak[index] = max(self.peak.get(index, 0), used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuMemoryPeak":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def launch_train(config: dict, folder: Path, processes: int, precision: str, distributed: str | Path | None = None,
                 port: int = 29500, gpus: str | None = None, extra: list[str] | None = None,
                 timeout_s: float | None = None) -> dict:
    """One `moekit train CONFIG` under `accelerate launch` (`distributed`: an example config's key in CONFIGS or
    an accelerate config file; None: DDP, or one process), its output in `folder/out`. Returns the log history (the output's trainer_state.json), wall time, peak GPU memory and,
    on failure, the end of the log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.yaml").write_text(yaml.safe_dump({**config, "output": str(folder / "out")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
               str(processes), "--mixed_precision", precision, "--dynamo_backend", "no", "--main_process_port", str(port)]
    if distributed:
        command += ["--config_file", str(CONFIGS.get(distributed, distributed))]
    elif processes > 1:
        command += ["--multi_gpu"]
    command += [*(extra or []), "-m", "moekit.cli", "train", str(folder / "train.yaml")]
    environment = {**os.environ, **SAFE_NCCL, "DS_ACCELERATOR": "cuda", "PYTHONUNBUFFERED": "1",
                   **({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {})}
    started = time.perf_counter()
    with GpuMemoryPeak() as memory:
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout_s)
            text, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as error:
            text, returncode = f"{error.stdout or ''}{error.stderr or ''}\nTIMEOUT after {timeout_s} s", 124
    (folder / "log.txt").write_text(text if isinstance(text, str) else str(text))
    result = {"processes": processes, "distributed": str(distributed or "plain"), "precision": precision,
              "returncode": returncode, "wall_s": round(time.perf_counter() - started, 1),
              "peak_gpu_memory_gib": {str(k): round(v / 1024, 1) for k, v in sorted(memory.peak.items())}}
    if returncode != 0:
        result["error"] = text[-4000:]
        return result
    state = folder / "out" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"] if state.exists() else []
    result["history"] = [entry for entry in history if "loss" in entry]
    result["output"] = str(folder / "out")
    return result


def steady_tokens_per_second(history: list[dict]) -> float | None:
    """Global tokens/s over the logged intervals after the first (which holds the warm-up)."""
    rates = [entry["throughput/tokens_per_second"] for entry in history if "throughput/tokens_per_second" in entry]
    steps = [entry["throughput/seconds_per_step"] for entry in history if "throughput/seconds_per_step" in entry]
    if len(rates) < 2:
        return rates[0] if rates else None
    tokens = sum(r * s for r, s in zip(rates[1:], steps[1:]))
    return tokens / sum(steps[1:])


def training_flops_per_token(model_folder: Path, sequence_length: int) -> float:
    """Model FLOPs of one training token (forward and backward, no recomputation): 6 x the weights a token
    multiplies (attention, the k routed experts' share of each expert stack, routers, LM head; not the embedding
    lookup) + 12 x layers x width x sequence for attention scores (the PaLM convention, causal mask not halved)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit  # noqa: F401
    from moekit.training.freeze import parameter_roles

    config = AutoConfig.from_pretrained(model_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    roles = parameter_roles(model)
    text = config.text_config
    share = getattr(config, "num_experts_per_tok", 1) / max(getattr(config, "num_experts", 1), 1)
    multiplied = 0.0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name and not text.tie_word_embeddings:
            continue
        multiplied += parameter.numel() * (share if roles[name] == "stack" else 1.0)
    return 6 * multiplied + 12 * text.num_hidden_layers * text.hidden_size * sequence_length
