"""Speed of `moekit.compose` against the disk floor, on CPU, as the number of experts grows.

    python bench/compose_speed.py [--quick] [--repeats 3] [--workdir /tmp/mixturekit_bench_speed] [--experts 2 4 8]
                                  [--cache warm|cold] [--json FILE]

Creates, once (cached in the work dir), random Llama-shaped source models saved as safetensors (bfloat16 by default):
one distinct copy per expert slot, each drawn from its own seed (helpers from bench/compose_memory.py). Then, for
each method and number of experts N, with the first N sources:

* compose: `moekit.compose` in a fresh Python process (bench/compose_memory.py's child), which reports the wall
  time of the `compose` call alone (imports excluded) and its own peak RSS (`VmHWM` of /proc/self/status).
* disk floor: in another fresh process (no torch), the least I/O that any composer has to do for the same case:
  read every byte of every input weight file once (`readinto` a reused 16 MiB buffer), then write files of exactly
  the sizes of the composed output's safetensors shards, each written, flushed and closed as `ShardWriter` does
  (neither `fsync`s since 2026-11-30; the figures in docs/performance.md before that date include an `fsync` in
  both). The ratio compose s / floor s is the number to watch (target <= 1.3).

Page cache: both runs of a cell start from the same state. With `--cache warm` (the default) the parent reads all of
the cell's input files right before each run, so the inputs come from the page cache for both and the floor is
mostly the write of the output; with `--cache cold` the parent instead evicts the inputs' pages
(`posix_fadvise(DONTNEED)`, which needs no privileges), so both read from the disk (on a VM the host may still cache
them). Compose runs first (its output's shard sizes are what the floor writes), its output is deleted, then the floor
runs and its files are deleted. Before each run the parent also calls `sync` and waits `--settle` seconds (5 by
default): on this benchmark's VM, writing into memory that was freed a moment ago (the previous run's deleted output)
was 3-6x faster than writing into memory that had been free for a few seconds (consistent with the guest reporting
free pages to the hypervisor, virtio-balloon `page_reporting`, ~2 s after they are freed), and without the wait the
floor, which starts right after compose's output is deleted, got that discount while compose (which first spends
seconds importing torch) did not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compose_memory as cm  # noqa: E402  (bench helpers: sources, fresh-process compose, VmHWM)

# 266.9M parameters, 533.8 MB in bfloat16: embed 32000x1024 and an untied lm_head (32.8M each), 12 layers of
# attention (4x1024x1024) and MLP (3x1024x4096).
FULL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000)
QUICK = cm.QUICK  # 2.7M parameters, 5.4 MB in bfloat16
CHUNK = 16 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# The disk floor (runs in a fresh process without torch)
# ---------------------------------------------------------------------------------------------------------------

def floor_child(job: dict) -> dict:
    """Read every input file fully, then write, flush and close files of the output shards' sizes."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    read = 0
    for path in job["inputs"]:
        with open(path, "rb", buffering=0) as handle:
            while got := handle.readinto(buffer):
                read += got
    middle = time.perf_counter()
    written = 0
    for path, size in job["outputs"]:
        with open(path, "wb") as handle:  # buffered, like ShardWriter
            left = size
            while left:
                step = min(left, CHUNK)
                handle.write(view[:step])
                left -= step
            handle.flush()
        written += size
    end = time.perf_counter()
    return {"read_s": middle - start, "write_s": end - middle, "wall_s": end - start, "read_bytes": read,
            "write_bytes": written, "peak_rss": cm._vm_hwm_bytes()}


def run_floor(inputs: list[Path], shard_sizes: list[int], folder: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = {"inputs": [str(p) for p in inputs],
           "outputs": [[str(folder / f"shard-{i}.bin"), size] for i, size in enumerate(shard_sizes)]}
    import subprocess

    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--floor-child", json.dumps(job)],
                          capture_output=True, text=True)
    shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"floor child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Page cache and compose
# ---------------------------------------------------------------------------------------------------------------

def set_cache(files: list[Path], mode: str) -> None:
    """warm: read the files (into the page cache); cold: evict their pages."""
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            if mode == "cold":
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                buffer = bytearray(CHUNK)
                while handle.readinto(buffer):
                    pass


def weight_files(sources: list[Path]) -> list[Path]:
    return [p for s in sources for p in sorted(s.glob("*.safetensors"))]


def run_compose(method: str, sources: list[Path], output: Path, shard_size: str,
                package_root: Path | None = None) -> dict:
    """Compose in a fresh process; keep the output's shard sizes, then delete the output."""
    result = cm.run_in_subprocess({"recipe": cm.recipe_for(method, sources, shard_size), "output": str(output)},
                                  package_root=package_root)
    folder = Path(result["output"])
    result["shard_sizes"] = [p.stat().st_size for p in sorted(folder.glob("*.safetensors"))]
    result["output_bytes"] = cm.folder_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def settle(files: list[Path], cache: str, seconds: float) -> None:
    """The state every run starts from: inputs warm (or cold), no dirty pages, and memory freed by the previous
    run's deleted output given `seconds` to settle (see the module doc)."""
    set_cache(files, cache)
    os.sync()
    time.sleep(seconds)


def measure_cell(method: str, sources: list[Path], workdir: Path, tag: str, shard_size: str, cache: str,
                 settle_s: float, baseline: Path | None = None) -> dict:
    """Compose, then the floor, each from the same page-cache state; with `baseline`, that checkout's compose too
    (between them), so the two versions are compared back to back."""
    inputs = weight_files(sources)
    settle(inputs, cache, settle_s)
    composed = run_compose(method, sources, workdir / f"out-{tag}-{method}-{len(sources)}", shard_size)
    cell = {"method": method, "experts": len(sources), "input_bytes": sum(p.stat().st_size for p in inputs),
            "compose": composed}
    if baseline is not None:
        settle(inputs, cache, settle_s)
        cell["baseline"] = run_compose(method, sources, workdir / f"base-{tag}-{method}-{len(sources)}", shard_size,
                                       package_root=baseline)
    settle(inputs, cache, settle_s)
    cell["floor"] = floor = run_floor(inputs, composed["shard_sizes"], workdir / f"floor-{tag}-{method}-{len(sources)}")
    cell["ratio"] = composed["wall_s"] / floor["wall_s"]
    return cell


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def environment() -> dict:
    import safetensors
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    memory = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0) if Path("/proc/meminfo").is_file() else 0
    return {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "cpus": os.cpu_count(), "cpu": cpu, "memory_bytes": memory, "kernel": platform.release(),
            "argv": sys.argv[1:]}


def _s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 0.1 else f"{seconds:.3f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.rjust(w) if i > 0 else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(row, widths))) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mixturekit_bench_speed"))
    parser.add_argument("--quick", action="store_true", help="a ~5 MB source model instead of ~533 MB")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["traditional", "btx"])
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the source models (and so of the output)")
    parser.add_argument("--shard-size", default="2GB", help="the recipe's shard_size (moekit's default)")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm",
                        help="inputs read into (warm) or evicted from (cold) the page cache before every run")
    parser.add_argument("--settle", type=float, help="seconds to wait before every run, after the previous run's "
                        "output was deleted (default 5; 0 with --quick)")
    parser.add_argument("--repeats", type=int, default=1, help="compose/floor pairs per cell; the table shows medians")
    parser.add_argument("--json", type=Path, help="also write every raw measurement here")
    parser.add_argument("--baseline", type=Path, help="a checkout (or a folder holding a `moekit` package) whose "
                        "compose is timed beside this one's in every cell")
    parser.add_argument("--floor-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_child is not None:
        print(json.dumps(floor_child(json.loads(args.floor_child))))
        return 0

    env = environment()
    settle_s = args.settle if args.settle is not None else (0.0 if args.quick else 5.0)
    fields, tag = (QUICK, "quick") if args.quick else (FULL, "full")
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sources = cm.make_sources(args.workdir, fields, max(args.experts), f"{tag}-{args.dtype}", dtype=args.dtype)
    source_bytes = (sources[0] / "model.safetensors").stat().st_size
    print(f"sources: {len(sources)} distinct random Llama models of {cm._mb(source_bytes)} MB {args.dtype} "
          f"({fields}) in {args.workdir} ({time.perf_counter() - start:.1f} s)")
    print(f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, safetensors "
          f"{env['safetensors']}, {env['cpus']} CPUs ({env['cpu']}), {env['memory_bytes'] / 2**30:.1f} GiB RAM, "
          f"shard_size {args.shard_size}, {args.cache} page cache, {settle_s:g} s settle before each run")

    cells = [(method, n) for method in args.methods for n in args.experts]
    runs = []
    for repeat in range(args.repeats):  # repeats outermost: a slow spell of the machine is spread over the cells
        for method, n in cells:
            cell = measure_cell(method, sources[:n], args.workdir, tag, args.shard_size, args.cache, settle_s,
                                args.baseline)
            runs.append({"repeat": repeat, **cell})
            base = (f", baseline {cell['baseline']['wall_s']:.2f} s ({cm._mb(cell['baseline']['peak_rss'])} MB)"
                    if "baseline" in cell else "")
            print(f"  [{repeat + 1}/{args.repeats}] {method} x{n}: compose {cell['compose']['wall_s']:.2f} s "
                  f"({cm._mb(cell['compose']['peak_rss'])} MB){base}, floor {cell['floor']['wall_s']:.2f} s",
                  flush=True)

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    rows, summary, reference = [], [], {}
    for method, n in cells:
        mine = [r for r in runs if r["method"] == method and r["experts"] == n]
        compose_s = median([r["compose"]["wall_s"] for r in mine])
        floor_s = median([r["floor"]["wall_s"] for r in mine])
        peak = median([r["compose"]["peak_rss"] for r in mine])
        pairs = sorted(r["ratio"] for r in mine)
        reference.setdefault(method, peak)
        entry = {"method": method, "experts": n, "compose_s": compose_s, "floor_s": floor_s,
                 "ratio": compose_s / floor_s, "pair_ratios": pairs, "peak_rss": peak,
                 "rss_vs_first": peak / reference[method]}
        if args.baseline is not None:
            entry["baseline_s"] = median([r["baseline"]["wall_s"] for r in mine])
            entry["baseline_peak_rss"] = median([r["baseline"]["peak_rss"] for r in mine])
        summary.append(entry)
        rows.append([method, str(n), cm._mb(mine[0]["input_bytes"]), cm._mb(mine[0]["compose"]["output_bytes"]),
                     _s(compose_s), _s(median([r["floor"]["read_s"] for r in mine])),
                     _s(median([r["floor"]["write_s"] for r in mine])), _s(floor_s), f"{entry['ratio']:.2f}",
                     f"{pairs[0]:.2f}-{pairs[-1]:.2f}", cm._mb(peak), f"{entry['rss_vs_first']:.2f}"])
    header = ["method", "experts", "input MB", "output MB", "compose s", "floor read s", "floor write s", "floor s",
              "compose / floor", "pair ratios", "peak RSS MB", f"RSS vs {args.experts[0]}"]
    print(f"medians of {args.repeats} run(s) per cell; 'pair ratios' is the min-max of compose/floor over the "
          f"back-to-back pairs; MB = 10^6 bytes")
    print(table(rows, header))
    if args.baseline is not None:
        print(f"\nbaseline: {args.baseline}")
        print(table([[e["method"], str(e["experts"]), _s(e["baseline_s"]), _s(e["compose_s"]),
                      f"{e['baseline_s'] / e['compose_s']:.2f}", cm._mb(e["baseline_peak_rss"]), cm._mb(e["peak_rss"])]
                     for e in summary],
                    ["method", "experts", "baseline s", "compose s", "baseline / compose", "baseline peak RSS MB",
                     "peak RSS MB"]))
    for entry in summary:
        if not (math.isfinite(entry["ratio"]) and entry["ratio"] > 0):
            print(f"warning: non-finite ratio in {entry['method']} x{entry['experts']}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "fields": fields, "dtype": args.dtype,
                                         "shard_size": args.shard_size, "cache": args.cache, "settle_s": settle_s,
                                         "repeats": args.repeats, "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
