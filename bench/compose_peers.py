"""Compose speed and peak memory against the two peers: mergekit-moe and the original MixtureKit, on CPU.

    python bench/compose_peers.py [--quick | --host] [--experts 4] [--repeats 3] [--workdir /tmp/mixturekit_bench_peers]
                                  [--mergekit-python .peers/mergekit/bin/python]
                                  [--original-python .peers/original/bin/python] [--json FILE]

Sources: four distinct random Llama models in bfloat16 (each from its own seed), with a config.json, a
generation_config.json and a small word-level tokenizer (both peers load the tokenizer), written once into the work
dir. They are made here with numpy, not torch, so the parent stays small. The default shape (`FULL`): hidden 1024,
intermediate 4096, 10 layers, 16 heads (16 KV heads), vocab 34048, untied lm_head: 237.5M parameters, 475.1 MB =
453.1 MiB per expert. `--quick` uses a ~5 MB shape; a test runs it for our side only.

The same recipe for all three: 4 experts, top-2 routing, the whole FFN of every block routed (Mixtral layout),
routers random, bfloat16 output, and each tool's default shard size (one shard here):

* ours: `python -m moekit compose recipe.yaml -o OUT` (method `traditional`, `router_init: random`).
* mergekit-moe: `mergekit-moe config.yml OUT` with `gate_mode: random` (no model forward, no download),
  `base_model` = expert 0, `experts_per_token: 2`, `dtype: bfloat16`. Note mergekit-moe copies the non-FFN
  weights from `base_model`; ours and the original average them over the experts.
* the original MixtureKit (PyPI `mixturekit` 1.1.1, import name `MixtureKit`): `mixturekit build config.yaml
  --output OUT` with `moe_method: traditional`, `num_experts_per_tok: 2` (it writes no router weights: they are
  initialised when the model is loaded).

Protocol: one unmeasured import of each tool first (so ours, which runs from the checkout, has its bytecode cached
as the pip-installed peers do; `PYTHONDONTWRITEBYTECODE` is removed from the children's environment). Then each run
is the whole command in a fresh process (interpreter start, imports, planning, reading, writing;
what a user waits for), under `/usr/bin/time` for the peak RSS (its `%M`: the largest resident set of the command;
`time` forks it from a tiny process, so it does not inherit this parent's high-water mark). Each round runs every
tool once, in an order rotated by one each round, so a slow spell of the machine (other processes share it) is spread
over all of them. Before every run: all the inputs are read (warm page cache), `sync`, then `--settle` seconds of
wait (see bench/compose_speed.py: memory freed a moment ago is faster to write into). Every output is deleted right
after its run. With `--imports` (default), each round also times each tool's imports alone (`python -c "import
..."`), the fixed cost inside its total. No tool `fsync`s its output (ours did until 2026-11-30: on the GPU host
that was most of its compose time, see docs/performance.md); written pages may still be dirty when a tool exits, and
the `sync` before the next run absorbs that.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from compose_speed import table  # bench/ is this script's folder, first on sys.path

REPO = Path(__file__).resolve().parent.parent

FULL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=10, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=34048)
# the Speed issue's GPU-host case: eight experts of about 1.2 GB (595.4M parameters each)
HOST = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=13, num_attention_heads=12,
            num_key_value_heads=12, vocab_size=34048)
QUICK = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=2000)
EXPERTS = 4
CHUNK = 16 * 2**20
TOOLS = ("ours", "mergekit-moe", "original")
IMPORTS = {"ours": "import moekit, moekit.cli",
           "mergekit-moe": "import mergekit.scripts.moe",
           "original": "import MixtureKit, MixtureKit.cli"}


# ---------------------------------------------------------------------------------------------------------------
# Sources (numpy only: bfloat16 is float32 with its low 16 bits dropped)
# ---------------------------------------------------------------------------------------------------------------

def llama_shapes(fields: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = fields["hidden_size"], fields["intermediate_size"], fields["vocab_size"]
    kv = h // fields["num_attention_heads"] * fields["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _tokenizer_files(folder: Path) -> None:
    """A word-level tokenizer (special tokens + a few words) that AutoTokenizer loads as PreTrainedTokenizerFast."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = "the of and to a in is it you that he was for on are with as I his they be at one have this".split()
    vocab = {token: i for i, token in enumerate(specials + words)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(specials)]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "model_max_length": 2048}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))


def make_source(folder: Path, fields: dict, seed: int) -> Path:
    """A Hugging Face Llama folder of random bfloat16 weights drawn from `seed`; reused if already there."""
    import numpy as np

    stamp = {"fields": fields, "seed": seed, "dtype": "bfloat16", "version": 1}
    marker = folder / "bench_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp and (folder / "model.safetensors").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = llama_shapes(fields)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(seed)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            values = rng.standard_normal(shape, dtype=np.float32)
            if len(shape) == 1:  # norms: around 1, different per expert too
                values = values * np.float32(0.1) + np.float32(1.0)
            else:
                values *= np.float32(0.02)
            handle.write((values.view(np.uint32) >> 16).astype("<u2").tobytes())
            del values
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "use_cache": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                               "pad_token_id": 0}, indent=2))
    _tokenizer_files(folder)
    marker.write_text(json.dumps(stamp))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The three commands and their configs
# ---------------------------------------------------------------------------------------------------------------

def write_configs(workdir: Path, sources: list[Path]) -> dict[str, Path]:
    ours = workdir / "ours-recipe.yaml"
    ours.write_text("method: traditional\nnum_experts_per_tok: 2\nrouter_init: random\nexperts:\n" + "".join(
        f"  - name: e{i}\n    source: {s}\n" for i, s in enumerate(sources)))
    mergekit = workdir / "mergekit-moe.yml"
    mergekit.write_text(f"base_model: {sources[0]}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\n"
                        "experts:\n" + "".join(f"  - source_model: {s}\n" for s in sources))
    original = workdir / "original.yaml"
    original.write_text("moe_method: traditional\nmodel_type: bench_moe_llama\nnum_experts_per_tok: 2\n"
                        "router_layers: []\nrouter_layers_index: []\nexperts:\n" + "".join(
                            f"  - expert_name: e{i}\n    model_id: {s}\n" for i, s in enumerate(sources)))
    return {"ours": ours, "mergekit-moe": mergekit, "original": original}


def command(tool: str, python: str, config: Path, output: Path) -> list[str]:
    if tool.startswith("ours"):
        return [python, "-m", "moekit", "compose", str(config), "-o", str(output)]
    if tool == "mergekit-moe":
        return [python, "-c", "import sys; from mergekit.scripts.moe import main; sys.argv[0] = 'mergekit-moe'; "
                "main()", str(config), str(output)]
    return [python, "-c", "import sys; from MixtureKit.cli import main; sys.argv[0] = 'mixturekit'; "
            "sys.exit(main())", "build", str(config), "--output", str(output)]


def child_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    # the peers are pip-installed, their bytecode compiled at install time; ours runs from the checkout: let every
    # tool read and write its bytecode cache, as an installed package would (the warm-up import writes ours)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return env


# Where /usr/bin/time is missing (a container image): a tiny Python that forks the command and reads its resource use
# with wait4, as `time` does; forked from this small process, the command inherits no large high-water mark.
WAIT4 = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
         "_, status, use = os.wait4(pid, 0)\nopen(sys.argv[1], 'w').write(f'{use.ru_maxrss} 0 {use.ru_utime} "
         "{use.ru_stime}\\n')\nsys.exit(os.waitstatus_to_exitcode(status))\n")


def rusage_wrapper(report: Path) -> list[str]:
    """The command prefix that writes `peak-KiB wall user sys` of the command to `report`."""
    if Path("/usr/bin/time").is_file():
        return ["/usr/bin/time", "-o", str(report), "-f", "%M %e %U %S"]
    return [sys.executable, "-S", "-c", WAIT4, str(report)]


def timed(argv: list[str], env: dict[str, str], workdir: Path) -> dict:
    """Run `argv` under /usr/bin/time (or `WAIT4`); wall seconds (measured here) and its peak RSS in bytes."""
    report = workdir / "time.out"
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run([*rusage_wrapper(report), *argv], env=env,
                          capture_output=True, text=True, cwd=str(workdir))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    fields = report.read_text().strip().splitlines()[-1].split()
    report.unlink()
    return {"wall_s": wall, "peak_rss": int(fields[0]) * 1024, "user_s": float(fields[2]), "sys_s": float(fields[3])}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def settle(files: list[Path], seconds: float) -> None:
    buffer = bytearray(CHUNK)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    os.sync()
    time.sleep(seconds)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def versions(tool: str, python: str, env: dict[str, str]) -> dict:
    package = {"ours": "moekit", "mergekit-moe": "mergekit", "original": "mixturekit"}[tool.split(" ")[0]]
    code = ("import json, platform, importlib.metadata as m; import torch, transformers, safetensors\n"
            f"try:\n    version = m.version({package!r})\nexcept m.PackageNotFoundError:\n"
            "    version = 'not installed (run from a checkout)'\n"
            "print(json.dumps({'package': version, 'python': platform.python_version(), "
            "'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'safetensors': safetensors.__version__}))")
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-500:]}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mixturekit_bench_peers"))
    parser.add_argument("--quick", action="store_true", help="~5 MB experts instead of 453 MiB")
    parser.add_argument("--host", action="store_true",
                        help="the GPU-host case: 1.19 GB experts (595.4M parameters) instead of 453 MiB")
    parser.add_argument("--experts", type=int, default=EXPERTS, help=f"how many experts (default {EXPERTS})")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every tool once")
    parser.add_argument("--settle", type=float, help="seconds to wait before each run (default 5; 0 with --quick)")
    parser.add_argument("--ours-python", default=sys.executable, help="the Python that has this moekit")
    parser.add_argument("--mergekit-python", help="a Python with mergekit installed (skipped if not given)")
    parser.add_argument("--original-python", help="a Python with the original MixtureKit (skipped if not given)")
    parser.add_argument("--baseline", type=Path, help="a folder holding another `moekit` package, run as a "
                        "fourth contender 'ours (baseline)' with --ours-python")
    parser.add_argument("--no-imports", dest="imports", action="store_false",
                        help="do not time each tool's imports alone")
    parser.add_argument("--json", type=Path, help="write every raw measurement here")
    args = parser.parse_args(argv)

    settle_s = args.settle if args.settle is not None else (0.0 if args.quick else 5.0)
    fields, tag = (QUICK, "quick") if args.quick else (HOST, "host") if args.host else (FULL, "full")
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(min(args.experts, os.cpu_count() or 1)) as pool:  # numpy: one core
        sources = list(pool.map(make_source, [workdir / f"source-{tag}-{i}" for i in range(args.experts)],
                                [fields] * args.experts, [2000 + i for i in range(args.experts)]))
    inputs = [s / "model.safetensors" for s in sources]
    source_bytes = inputs[0].stat().st_size
    parameters = sum(int(__import__("math").prod(s)) for s in llama_shapes(fields).values())
    print(f"sources: {args.experts} distinct random Llama models, {parameters / 1e6:.1f}M parameters, "
          f"{source_bytes / 1e6:.1f} MB = {source_bytes / 2**20:.1f} MiB bfloat16 each ({fields}) in {workdir} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    configs = write_configs(workdir, sources)

    for option in ("ours_python", "mergekit_python", "original_python"):  # the runs start in the work dir
        if getattr(args, option):
            setattr(args, option, os.path.abspath(getattr(args, option)))  # not resolved: a venv's python is a link
    tools: dict[str, tuple[str, Path, Path | None]] = {"ours": (args.ours_python, configs["ours"], REPO)}
    if args.baseline is not None:
        tools["ours (baseline)"] = (args.ours_python, configs["ours"], args.baseline.absolute())
    if args.mergekit_python:
        tools["mergekit-moe"] = (args.mergekit_python, configs["mergekit-moe"], None)
    if args.original_python:
        tools["original"] = (args.original_python, configs["original"], None)
    env = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "kernel": platform.release(),
           "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name")), "") if Path("/proc/cpuinfo").is_file() else "",
           "memory_bytes": next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                                 if line.startswith("MemTotal:")), 0) if Path("/proc/meminfo").is_file() else 0,
           "argv": sys.argv[1:], "settle_s": settle_s,
           "rusage": rusage_wrapper(workdir / "time.out")[0], "fields": fields, "source_bytes": source_bytes,
           "parameters": parameters, "tools": {}}
    for name, (python, _, path) in tools.items():
        env["tools"][name] = {"python": python, **versions(name, python, child_env(path))}
        print(f"  {name}: {env['tools'][name]}", flush=True)

    for name, (python, _, path) in tools.items():  # warm-up, not measured: bytecode caches, the interpreter's files
        timed([python, "-c", IMPORTS[name.split(" ")[0]]], child_env(path), workdir)

    names = list(tools)
    runs = []
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            python, config, path = tools[name]
            output = workdir / f"out-{name.replace(' ', '_').strip('()')}"
            shutil.rmtree(output, ignore_errors=True)
            settle(inputs, settle_s)
            result = timed(command(name, python, config, output), child_env(path), workdir)
            result.update(tool=name, repeat=repeat, output_bytes=folder_bytes(output),
                          weight_bytes=weight_bytes(output))
            shutil.rmtree(output, ignore_errors=True)
            if args.imports:
                os.sync()
                time.sleep(min(settle_s, 1.0))
                code = IMPORTS[name.split(" ")[0]]
                result["imports"] = timed([python, "-c", code], child_env(path), workdir)
            runs.append(result)
            extra = f", imports {result['imports']['wall_s']:.2f} s" if "imports" in result else ""
            print(f"  [{repeat + 1}/{args.repeats}] {name}: {result['wall_s']:.2f} s, peak RSS "
                  f"{result['peak_rss'] / 2**30:.2f} GiB, output {result['weight_bytes'] / 1e6:.1f} MB{extra}",
                  flush=True)

    summary, rows = [], []
    for name in names:
        mine = [r for r in runs if r["tool"] == name]
        walls, peaks = [r["wall_s"] for r in mine], [r["peak_rss"] for r in mine]
        entry = {"tool": name, "wall_s": median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
                 "peak_rss": median(peaks), "peak_rss_min": min(peaks), "peak_rss_max": max(peaks),
                 "weight_bytes": mine[0]["weight_bytes"], "cpu_s": median([r["user_s"] + r["sys_s"] for r in mine])}
        if args.imports:
            entry["imports_s"] = median([r["imports"]["wall_s"] for r in mine])
        summary.append(entry)
        rows.append([name, f"{entry['wall_s']:.2f}", f"{entry['wall_min_s']:.2f}-{entry['wall_max_s']:.2f}",
                     f"{entry['peak_rss'] / 2**30:.2f}",
                     f"{entry['peak_rss_min'] / 2**30:.2f}-{entry['peak_rss_max'] / 2**30:.2f}",
                     f"{entry['cpu_s']:.2f}", f"{entry['imports_s']:.2f}" if args.imports else "-",
                     f"{entry['weight_bytes'] / 1e6:.1f}"])
    print(f"\nmedians of {args.repeats} round(s), whole command in a fresh process; GiB = 2^30 bytes")
    print(table(rows, ["tool", "wall s", "wall range", "peak RSS GiB", "RSS range", "CPU s (user+sys)", "imports s",
                       "output MB"]))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
