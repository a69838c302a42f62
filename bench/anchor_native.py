"""The composed models against transformers' own Mixtral exported from the same traditional composition, in one call.

    python bench/anchor_native.py --json $OUT/anchor.json                        # GPU, bf16: issue and small shapes
    python bench/anchor_native.py --shapes e8wide --json $OUT/anchor-e8wide.json  # the large shape on its own
    python bench/anchor_native.py --quick --device cpu                           # CPU, fp32, tiny: a smoke run

For each shape four models are timed side by side: `dense` (the Llama base), `btx` and `traditional` (composed,
random routers and experts) and `native`: `moekit export --layout packed` of that very `traditional` model (saved
with `save_pretrained`, exported, loaded back by transformers as its own `MixtralForCausalLM`, whose experts
implementation is transformers' default). Rows (`--rows`, any subset): `fwdbwd` forward+backward 1x32 (loss and every
gradient), `fwd` forward 1x32, `gen1` and `gen32` plain greedy `generate()` (dynamic cache, as a user calls it) at
batch 1 and 32, and `profile`: per decoded token at batch 1, the kernel launches (GPU), aten operators and host time
of each model. Every row gives each model's ratio to the dense model of the same call and, on CUDA, its peak memory;
the decoding rows give tokens/s and the achieved bandwidth: bytes of parameters one decoding step reads (embedding
rows excluded; at batch B the shared weights once and min(E, B*k) experts per block) times steps per second.

Shapes (Llama, vocab 49152, top-2, 32-token prompts): `issue` d2048/f8192, 16/4 heads, 4 layers, E=4, 128 new
tokens; `small` SmolLM2-135M's d576/f1536, 9/3 heads, 30 layers, E=4, 64 new tokens (its decoding is 30 host-bound
blocks a token); `e8wide` d4096/f14336, 32/8 heads, 4 layers, E=8, 128 new tokens. The JSON is written after every
shape, so a call stopped at its time limit keeps the shapes it finished.

Correctness gate, before any timing and on the device: the exported checkpoint holds exactly the composed model's
tensors (bitwise), and the native model's logits equal the composed model's: in float32 on the CPU (median per-token
relative error <= 1e-4 with the native experts' plain loop, shapes up to 2B parameters; grouped_mm's float32 error
is recorded, not gated) and in the timed dtype (median per-token error within twice the dense model's own bf16
rounding, measured in the same call; above 2B parameters, native against composed in bf16 within 5e-2). Otherwise
nothing is timed and the script exits 1.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from end_to_end import SHAPES as E2E_SHAPES, composed_model, dense_model  # noqa: E402
from timing import environment, relative_error, synchronize, time_ms  # noqa: E402

COMMON = dict(vocab=49152, top_k=2, prompt=32, new_tokens=128, batches=[1, 32], forward_shape=(1, 32))
SHAPES = {
    "issue": dict(E2E_SHAPES["issue"], **COMMON),
    "small": dict(E2E_SHAPES["small"], **dict(COMMON, new_tokens=64)),  # 30 host-bound blocks: half the tokens
    "e8wide": dict(E2E_SHAPES["wide"], **COMMON, experts=8),
}
QUICK = dict(d=64, f=128, layers=2, vocab=512, heads=4, kv_heads=2, experts=4, top_k=2, prompt=8, new_tokens=8,
             batches=[1, 4], forward_shape=(1, 8))
ROWS = ("fwdbwd", "fwd", "gen1", "gen32", "profile")
MODELS = ("dense", "btx", "traditional", "native")
GENERATION_ROUNDS = 3


def export_native(traditional, workdir: Path, dtype: torch.dtype, device: torch.device):
    """`moekit export` of `traditional` (saved as composed), loaded back by transformers as its own model class."""
    from transformers import AutoModelForCausalLM

    from moekit.export import export

    composed_folder, native_folder = workdir / "traditional", workdir / "native"
    for folder in (composed_folder, native_folder):
        shutil.rmtree(folder, ignore_errors=True)
    traditional.save_pretrained(composed_folder)
    export(composed_folder, "auto", native_folder, layout="packed")
    shutil.rmtree(composed_folder, ignore_errors=True)
    native = AutoModelForCausalLM.from_pretrained(native_folder, dtype=dtype)  # no device_map: accelerate not needed
    return native.to(device).eval()


def gate(models: dict, spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The correctness gate (see the module docstring): the errors it measured, and whether they pass."""
    traditional, native = models["traditional"], models["native"]
    composed_state, native_state = traditional.state_dict(), native.state_dict()
    tensors = [name for name in native_state if not name.endswith("inv_freq")]
    missing = [name for name in tensors if name not in composed_state]
    different = [name for name in tensors if name in composed_state
                 and not torch.equal(native_state[name], composed_state[name].to(native_state[name].device))]
    result = dict(native_class=type(native).__name__,
                  native_experts_implementation=getattr(native.config, "_experts_implementation", None),
                  tensors_compared=len(tensors), tensors_missing=missing[:5], tensors_different=different[:5])
    ids = torch.randint(3, spec["vocab"], (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        parameters = sum(p.numel() for p in traditional.parameters())
        if parameters <= 2e9 or device.type == "cpu":
            # float32 on the CPU: on the GPU our Triton kernels and cuBLAS round float32 products like TF32, so a
            # float32 reference there is not exact (the H100 gave 8e-3 between two correct models)
            cpu = torch.device("cpu")
            composed32 = copy.deepcopy(traditional).to(cpu, torch.float32)
            native32 = copy.deepcopy(native).to(cpu, torch.float32)
            ids32 = ids.to(cpu)
            reference = composed32(input_ids=ids32).logits
            result["float32_error_grouped_mm"] = relative_error(native32(input_ids=ids32).logits, reference)
            if hasattr(native32, "set_experts_implementation"):  # the weights' meaning: the plain per-expert loop
                native32.set_experts_implementation("eager")
            native_logits = native32(input_ids=ids32).logits
            result["float32_error"] = median_token_error(native_logits, reference)
            result["float32_error_all_tokens"] = relative_error(native_logits, reference)
            dense32 = copy.deepcopy(models["dense"]).to(cpu, torch.float32)
            result["dense_rounding"] = relative_error(models["dense"](input_ids=ids).logits.to(cpu),
                                                      dense32(input_ids=ids32).logits)
            result["timed_dtype_error"] = median_token_error(native(input_ids=ids).logits.to(cpu), reference)
            result["composed_timed_dtype_error"] = median_token_error(traditional(input_ids=ids).logits.to(cpu),
                                                                      reference)
            del composed32, native32, dense32, reference, native_logits
        else:  # too large for float32 copies beside the timed models: the timed dtype against each other
            result["timed_dtype_error"] = median_token_error(native(input_ids=ids).logits,
                                                             traditional(input_ids=ids).logits)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    limit = 2 * result["dense_rounding"] + 1e-3 if "dense_rounding" in result else 5e-2
    result["passed"] = bool(not missing and not different and result.get("float32_error", 0.0) <= 1e-4
                            and result["timed_dtype_error"] <= max(limit, 1e-5))
    return result


def median_token_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The median over tokens of each token's relative logit error: in 16 bits a router's logits may round a near
    tie the other way for a token or two (Mixtral's router multiplies in 16 bits, ours in float32), which moves
    those tokens' logits a lot and the others not at all; the float32 check above is the exact one."""
    got, want = got.float().reshape(-1, got.shape[-1]), want.float().reshape(-1, want.shape[-1])
    return ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)).median().item()


def parameter_bytes_per_step(spec: dict, batch: int, element_size: int, model: str) -> int:
    """Bytes of parameters one decoding step reads: every weight but the embedding table (one row per token), and of
    the routed experts only those chosen: k per block at batch 1, at most min(E, batch * k) at batch `batch`."""
    d, f, layers, vocab = spec["d"], spec["f"], spec["layers"], spec["vocab"]
    kv = d * spec["kv_heads"] // spec["heads"]
    attention, ffn, head, norms = 2 * d * d + 2 * d * kv, 3 * d * f, d * vocab, (2 * layers + 1) * d
    if model == "dense":
        per_block = attention + ffn
    else:
        experts = min(spec["experts"], batch * spec["top_k"])
        routers = spec["experts"] * (2 * d + f if model == "btx" else d)  # btx: gate, up (width d) and down (f)
        per_block = attention + experts * ffn + routers
    return (layers * per_block + head + norms) * element_size


def peak_mb(model, device: torch.device, fn) -> float | None:
    """Peak device memory of `model` while `fn` runs, in MB: its weights and what the run allocates, without the
    other models resident beside it (they are not the same call's to pay for)."""
    gc.collect()
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    others = torch.cuda.memory_allocated(device) - sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - others) / 1e6


def _peak(row: dict, name: str) -> str:
    peak = row.get(f"{name}_peak_mb")
    return "" if peak is None else f", peak {peak / 1e3:.2f} GB"


def forward_row(models: dict, spec: dict, device: torch.device, backward: bool) -> dict:
    batch, length = spec["forward_shape"]
    ids = torch.randint(3, spec["vocab"], (batch, length), device=device)
    row = dict(row="fwdbwd" if backward else "fwd", batch=batch, length=length)
    for name, model in models.items():
        model.train(backward)
        model.requires_grad_(backward)

        def step(model=model):
            if backward:
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(input_ids=ids)

        row[f"{name}_ms"] = time_ms(step, device)
        row[f"{name}_peak_mb"] = peak_mb(model, device, step)
        model.requires_grad_(False)
        model.eval()
    for name in models:
        row[f"{name}_ratio"] = row[f"{name}_ms"] / row["dense_ms"]
        if row[f"{name}_peak_mb"] is not None:
            row[f"{name}_peak_ratio"] = row[f"{name}_peak_mb"] / row["dense_peak_mb"]
    print(f"{row['row']} {batch}x{length}: " + "  ".join(
        f"{n} {row[f'{n}_ms']:.2f} ms ({row[f'{n}_ratio']:.2f}x{_peak(row, n)})" for n in models), flush=True)
    return row


def generation_row(models: dict, spec: dict, device: torch.device, batch: int) -> dict:
    """Median tokens/s of plain greedy `generate()` over `GENERATION_ROUNDS` turns in which the models take turns."""
    prompt = torch.randint(3, spec["vocab"], (batch, spec["prompt"]), device=device)
    settings = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False,
                    pad_token_id=0)
    row = dict(row=f"gen{batch}", batch=batch, prompt=spec["prompt"], new_tokens=spec["new_tokens"])
    with torch.no_grad():
        for name, model in models.items():
            # warm-up, and the peak memory of one generation
            row[f"{name}_peak_mb"] = peak_mb(model, device, lambda model=model: model.generate(prompt, **settings))
        samples = {name: [] for name in models}
        for _ in range(GENERATION_ROUNDS):
            for name, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                model.generate(prompt, **settings)
                synchronize(device)
                samples[name].append(batch * spec["new_tokens"] / (time.perf_counter() - start))
    element = next(models["dense"].parameters()).element_size()
    for name, rates in samples.items():
        row[f"{name}_tokens_per_s"] = statistics.median(rates)
        row[f"{name}_tokens_per_s_rounds"] = rates
        step_bytes = parameter_bytes_per_step(spec, batch, element, "traditional" if name == "native" else name)
        row[f"{name}_bytes_per_step"] = step_bytes
        row[f"{name}_gb_per_s"] = step_bytes * row[f"{name}_tokens_per_s"] / batch / 1e9
    for name in models:
        row[f"{name}_ratio"] = row[f"{name}_tokens_per_s"] / row["dense_tokens_per_s"]
        if row[f"{name}_peak_mb"] is not None:
            row[f"{name}_peak_ratio"] = row[f"{name}_peak_mb"] / row["dense_peak_mb"]
    print(f"generate batch {batch}: " + "  ".join(
        f"{n} {row[f'{n}_tokens_per_s']:,.0f} tok/s ({row[f'{n}_ratio']:.2f}x, {row[f'{n}_gb_per_s']:.0f} GB/s"
        f"{_peak(row, n)})"
        for n in models), flush=True)
    return row


def profile_row(models: dict, spec: dict, device: torch.device) -> dict:
    """Per decoded token at batch 1 (the difference between 12 and 4 new tokens, so the prompt's forward cancels):
    kernel launches, aten operators (all levels) and host milliseconds of each model, and its costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(3, spec["vocab"], (1, spec["prompt"]), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lengths = (4, 12)
    row = dict(row="profile", batch=1, tokens=lengths)
    for name, model in models.items():
        counts, host, tables = [], [], None
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            for new in lengths:
                with profile(activities=activities) as prof:
                    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                events = prof.events()
                launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                               "cudaLaunchKernelExC"))
                operators = sum(1 for e in events if e.name.startswith("aten::"))
                counts.append((launches, operators))
                synchronize(device)
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                synchronize(device)
                host.append(time.perf_counter() - start)
                tables = prof.key_averages()
        steps = lengths[1] - lengths[0]
        row[f"{name}_launches_per_token"] = (counts[1][0] - counts[0][0]) / steps
        row[f"{name}_aten_ops_per_token"] = (counts[1][1] - counts[0][1]) / steps
        row[f"{name}_ms_per_token"] = (host[1] - host[0]) / steps * 1e3
        top = sorted(tables, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        row[f"{name}_top_host_operators"] = [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in top]
    print("per decoded token, batch 1: " + "  ".join(
        f"{n} {row[f'{n}_launches_per_token']:.0f} launches, {row[f'{n}_aten_ops_per_token']:.0f} aten ops, "
        f"{row[f'{n}_ms_per_token']:.2f} ms" for n in models), flush=True)
    return row


def run_shape(name: str, spec: dict, device: torch.device, dtype: torch.dtype, rows: tuple[str, ...],
              workdir: Path) -> dict:
    print(f"\n=== shape {name}: d{spec['d']} f{spec['f']} layers {spec['layers']} E{spec['experts']} "
          f"k{spec['top_k']}", flush=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    models = {"dense": dense_model(spec, device, dtype).eval(), "btx": composed_model(spec, "btx", device, dtype).eval(),
              "traditional": composed_model(spec, "traditional", device, dtype).eval()}
    for model in models.values():
        model.requires_grad_(False)
    models["native"] = export_native(models["traditional"], workdir, dtype, device)
    models["native"].requires_grad_(False)
    result = dict(shape=name, spec=spec, setup_s=time.perf_counter() - started,
                  parameters={n: sum(p.numel() for p in m.parameters()) for n, m in models.items()})
    result["gate"] = checked = gate(models, spec, device, dtype)
    print("gate: " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in checked.items()),
          flush=True)
    if not checked["passed"]:
        print("WRONG: the native export does not reproduce the composed traditional model; nothing timed")
        return result
    result["rows"] = []
    for row in rows:
        if row in ("fwdbwd", "fwd"):
            result["rows"].append(forward_row(models, spec, device, backward=row == "fwdbwd"))
        elif row.startswith("gen"):
            result["rows"].append(generation_row(models, spec, device, spec["batches"][0 if row == "gen1" else 1]))
        else:
            result["rows"].append(profile_row(models, spec, device))
    result["wall_s"] = time.perf_counter() - started
    del models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(workdir / "native", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape (CPU smoke run)")
    parser.add_argument("--shapes", nargs="+", default=["issue", "small"], choices=sorted(SHAPES))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--new-tokens", type=int, help="new tokens per generation (default 128, small 64, quick 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, help="where the composed and exported checkpoints are written")
    parser.add_argument("--start-shapes-until-s", type=float,
                        help="start no further shape after this many seconds (a call's time limit in mind)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import moekit

    results = dict(environment=environment(device), command=" ".join(sys.argv),
                   package=str(Path(moekit.__file__).parent), shapes=[])
    print(results["environment"], "| moekit from", results["package"], flush=True)
    shapes = {"quick": QUICK} if args.quick else {name: SHAPES[name] for name in args.shapes}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="anchor_native_"))
    started = time.perf_counter()
    failed = False
    for name, spec in shapes.items():
        if args.start_shapes_until_s is not None and time.perf_counter() - started > args.start_shapes_until_s:
            print(f"\nshape {name} not started: {time.perf_counter() - started:.0f} s have passed", flush=True)
            results.setdefault("not_started", []).append(name)
            continue
        spec = dict(spec, **({"new_tokens": args.new_tokens} if args.new_tokens else {}))
        result = run_shape(name, spec, device, dtype, tuple(args.rows), workdir)
        failed |= not result["gate"]["passed"]
        results["shapes"].append(result)
        if args.json:  # after every shape, so a run stopped at its time limit keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    results["wall_s"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\ntotal {results['wall_s']:.0f} s", flush=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
