"""Host time of one decoded token at batch 1, on CPU at a tiny shape: what a GPU's decoding waits on.

    python bench/decode_overhead.py                                   # this checkout
    python bench/decode_overhead.py --roots .baseline . --rounds 5    # two checkouts' `moekit`, alternating processes

At a tiny shape (d64/f128, 4 layers, E=4, top-2, float32, one thread) the arithmetic is negligible, so the time of a
decoded token is the Python and operator dispatch around it, as on a GPU at batch 1. Four models are timed in turns:
`dense` (the Llama base), `btx`, `traditional`, and `native`: the traditional model exported by `moekit export` and
loaded as transformers' own `MixtralForCausalLM`. A token's time is the difference between plain greedy `generate()`
of 40 and of 8 new tokens, divided by 32, so the prompt and generate's setup cancel; the aten operators per token are
counted the same way with torch.profiler. Each process reports medians over `--repeats` turns; with `--roots`, the
checkouts run in alternating fresh processes (`--rounds` each) and the table gives the median of each figure and of
each ratio to the dense model of the same process (the machine is shared: read ratios, not milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = dict(d=64, f=128, layers=4, vocab=512, heads=4, kv_heads=2, experts=4, top_k=2)
SHORT, LONG = 8, 40


def measure(repeats: int) -> dict:
    """One process: per-token milliseconds (median of `repeats` turns) and aten operators of the four models."""
    import torch

    import moekit  # first, from PYTHONPATH: the bench modules below put this checkout on sys.path

    torch.set_num_threads(1)
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    from anchor_native import export_native
    from end_to_end import composed_model, dense_model
    from torch.profiler import ProfilerActivity, profile

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    models = {"dense": dense_model(SPEC, cpu, torch.float32).eval(),
              "btx": composed_model(SPEC, "btx", cpu, torch.float32).eval(),
              "traditional": composed_model(SPEC, "traditional", cpu, torch.float32).eval()}
    with tempfile.TemporaryDirectory() as folder:
        models["native"] = export_native(models["traditional"], Path(folder), torch.float32, cpu)
    prompt = torch.randint(3, SPEC["vocab"], (1, 8), generator=torch.Generator().manual_seed(0))

    def generate(model, new: int) -> None:
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    result = {"package": str(Path(moekit.__file__).parent)}
    with torch.no_grad():
        for model in models.values():
            generate(model, SHORT)
        samples = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                generate(model, SHORT)
                middle = time.perf_counter()
                generate(model, LONG)
                samples[name].append(((time.perf_counter() - middle) - (middle - start)) / (LONG - SHORT) * 1e3)
        for name, model in models.items():
            counts = []
            for new in (SHORT, LONG):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    generate(model, new)
                counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::")))
            result[f"{name}_ms_per_token"] = statistics.median(samples[name])
            result[f"{name}_aten_ops_per_token"] = (counts[1] - counts[0]) / (LONG - SHORT)
    for name in models:
        result[f"{name}_ratio"] = result[f"{name}_ms_per_token"] / result["dense_ms_per_token"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", nargs="+", type=Path, help="checkouts whose moekit to compare (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per checkout, alternating")
    parser.add_argument("--repeats", type=int, default=5, help="turns of the four models within a process")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # a child: print one JSON line
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.repeats)))
        return
    roots = [root.resolve() for root in (args.roots or [Path(__file__).resolve().parents[1]])]
    runs = {str(root): [] for root in roots}
    for round_ in range(args.rounds):
        for root in roots:
            environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
            finished = subprocess.run([sys.executable, __file__, "--measure", "--repeats", str(args.repeats)],
                                      env=environment, check=True, capture_output=True, text=True)
            runs[str(root)].append(json.loads(finished.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {root}: " + "  ".join(
                f"{n} {runs[str(root)][-1][f'{n}_ms_per_token']:.2f} ms" for n in ("dense", "btx", "traditional",
                                                                                  "native")), flush=True)
    table = {}
    print(f"\n{'checkout':<40} {'model':<12} {'ms/token':>9} {'vs dense':>9} {'aten ops/token':>15}")
    for root, results in runs.items():
        for name in ("dense", "btx", "traditional", "native"):
            figures = {key: statistics.median(r[f"{name}_{key}"] for r in results)
                       for key in ("ms_per_token", "ratio", "aten_ops_per_token")}
            table[f"{root}:{name}"] = figures
            print(f"{root[-40:]:<40} {name:<12} {figures['ms_per_token']:>9.2f} {figures['ratio']:>8.2f}x "
                  f"{figures['aten_ops_per_token']:>15.0f}")
    if args.json:
        args.json.write_text(json.dumps(dict(command=" ".join(sys.argv), spec=SPEC, runs=runs, medians=table),
                                        indent=1))


if __name__ == "__main__":
    main()
