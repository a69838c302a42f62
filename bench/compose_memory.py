"""Peak memory (RSS) of `moekit.compose` as the number of experts grows, on CPU.

    python bench/compose_memory.py [--quick] [--workdir /tmp/mixturekit_bench] [--experts 2 4 6]

Creates, once (cached in the work dir), random Llama-shaped float32 source models saved as safetensors: one distinct
copy per expert slot, each drawn from its own seed, so every expert of a composition is a different file with
different weights. Then, for each method and number of experts, runs the composition in a fresh Python process and
records, in that process:

* peak RSS: `VmHWM` from /proc/self/status, the high-water mark of the process's own address space. NOT
  `ru_maxrss`: on Linux a child started by `subprocess` inherits the parent's high-water mark across fork/exec
  (`ru_maxrss` is carried in the signal struct), so a child of a parent that has touched 800 MB reports >= 800 MB
  even when it itself never exceeds 10 MB. `ru_maxrss` is still recorded, as a cross-check, in the JSON.
* wall time of the `compose` call alone (imports excluded), and the size of the checkpoint it wrote.

A baseline process that only imports moekit and torch gives the RSS that every composition pays regardless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ~28.6M parameters, ~114 MB in float32: embed 8000x512 and an untied lm_head (4.1M each), 6 layers of
# attention (4x512x512) and MLP (3x512x1536).
FULL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=8000)
# ~2.7M parameters, ~11 MB.
QUICK = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=2000)


# ---------------------------------------------------------------------------------------------------------------
# Source models
# ---------------------------------------------------------------------------------------------------------------

def llama_config(fields: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**{"max_position_embeddings": 256, "tie_word_embeddings": False, "pad_token_id": 0,
                          "bos_token_id": 1, "eos_token_id": 2, **fields})


def make_source(folder: Path, fields: dict, seed: int, dtype: str = "float32", device: str = "cpu",
                tokenizer: Path | None = None) -> Path:
    """A Hugging Face folder (config.json + model.safetensors) of random weights from `seed`, stored as `dtype`
    (a torch dtype name); reused if present. `device` draws them there (a GPU draws an 8B model in seconds);
    `tokenizer` is a folder whose files are copied in.

    The tensor names and shapes come from a `LlamaForCausalLM` built on the meta device (no memory); the weights are
    drawn one tensor at a time, so making a source costs about the size of the model once, not a model instance.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    stamp = {"fields": fields, "seed": seed, **({"dtype": dtype} if dtype != "float32" else {})}
    marker = folder / "bench_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp and (folder / "model.safetensors").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = llama_config(fields)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms: around 1, and different per expert too
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
        else:
            tensors[name] = 0.02 * torch.randn(shape, generator=generator, device=device)
        tensors[name] = tensors[name].to(getattr(torch, dtype)).cpu()
    if dtype != "float32":
        config.dtype = dtype
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    for path in (tokenizer.iterdir() if tokenizer else ()):
        shutil.copy(path, folder / path.name)
    marker.write_text(json.dumps(stamp))
    return folder


def make_sources(workdir: Path, fields: dict, count: int, tag: str, dtype: str = "float32") -> list[Path]:
    return [make_source(workdir / f"source-{tag}-{i}", fields, seed=1000 + i, dtype=dtype) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Measuring in a fresh process
# ---------------------------------------------------------------------------------------------------------------

def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(job: dict) -> dict:
    """Run in the fresh process: import, optionally compose, and report this process's own peak RSS."""
    import torch  # noqa: F401
    import moekit

    result: dict = {"import_peak_rss": _vm_hwm_bytes()}
    if job.get("recipe") is not None:
        start = time.perf_counter()
        path = moekit.compose(job["recipe"], output=job["output"], overwrite=True, progress=False)
        result["wall_s"] = time.perf_counter() - start
        result["output"] = str(path)
    result["peak_rss"] = _vm_hwm_bytes()
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return result


def run_in_subprocess(job: dict, python: str = sys.executable, package_root: Path | None = None) -> dict:
    """Run `child(job)` in a new interpreter and return what it reported (the last line of its stdout, JSON);
    `package_root` is the checkout whose `moekit` it imports (this one by default)."""
    root = str(package_root or REPO)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "TQDM_DISABLE": "1"}
    done = subprocess.run([python, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                          capture_output=True, text=True, env=env, cwd=str(REPO))
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recipe_for(method: str, sources: list[Path], shard_size: str = "200MB") -> dict:
    return {"method": method, "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)],
            "num_experts_per_tok": 2, "shard_size": shard_size}


def safetensors_headers(folder: Path) -> dict[str, dict]:
    """Every tensor's header entry in the checkpoint's safetensors files (reads headers only)."""
    entries = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        entries.update(header)
    return entries


def largest_tensor_bytes(folder: Path) -> int:
    return max(end - begin for begin, end in (e["data_offsets"] for e in safetensors_headers(folder).values()))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(method: str, sources: list[Path], output: Path, shard_size: str = "200MB") -> dict:
    result = run_in_subprocess({"recipe": recipe_for(method, sources, shard_size), "output": str(output)})
    folder = Path(result["output"])
    result.update(method=method, experts=len(sources), output_bytes=folder_bytes(folder),
                  largest_tensor=largest_tensor_bytes(folder))
    shutil.rmtree(folder, ignore_errors=True)
    return result


def baseline() -> dict:
    return run_in_subprocess({"recipe": None})


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mixturekit_bench"))
    parser.add_argument("--quick", action="store_true", help="a ~11 MB source model instead of ~114 MB")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--methods", nargs="+", default=["traditional", "btx"])
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the table shows medians and the min-max of peak RSS")
    parser.add_argument("--json", type=Path, help="also write every raw measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch
    import transformers

    fields, tag = (QUICK, "quick") if args.quick else (FULL, "full")
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sources = make_sources(args.workdir, fields, max(args.experts), tag)
    source_bytes = (sources[0] / "model.safetensors").stat().st_size
    print(f"sources: {len(sources)} distinct random Llama models of {_mb(source_bytes)} MB float32 "
          f"({fields}) in {args.workdir} ({time.perf_counter() - start:.1f} s)")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs, shard_size {args.shard_size}, peak RSS = VmHWM of the composing process")

    bases = [baseline() for _ in range(max(1, args.repeats))]
    base = sorted(b["peak_rss"] for b in bases)[len(bases) // 2]
    print(f"import baseline (import moekit, torch): {_mb(base)} MB (MB = 10^6 bytes)")
    rows, raw = [], {"baseline": bases, "runs": []}
    for method in args.methods:
        reference = None
        for n in args.experts:
            runs = [measure(method, sources[:n], args.workdir / f"out-{tag}-{method}-{n}", args.shard_size)
                    for _ in range(args.repeats)]
            raw["runs"].extend(runs)
            peaks = sorted(r["peak_rss"] for r in runs)
            peak, wall = peaks[len(runs) // 2], sorted(r["wall_s"] for r in runs)[len(runs) // 2]
            reference = reference or peak
            rows.append([method, str(n), _mb(runs[0]["output_bytes"]), f"{wall:.2f}", _mb(peak),
                         f"{_mb(peaks[0])}-{_mb(peaks[-1])}", _mb(peak - base), _mb(runs[0]["largest_tensor"]),
                         f"{peak / reference:.2f}"])
    header = ["method", "experts", "output MB", "wall s", "peak RSS MB", "peak RSS range", "peak - import MB",
              "largest tensor MB", f"ratio vs {args.experts[0]}"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
