"""End-to-end benchmark: a whole composed model against its dense base, forward, training and generation.

    python bench/end_to_end.py [--shapes issue e8 e16 wide small] [--compile] [--json out.json]   # GPU, bf16
    python bench/end_to_end.py --quick --device cpu                                       # CPU, fp32, a smoke run
    python bench/end_to_end.py --package-root /path/to/other/checkout ...                 # time another version

Shapes (Llama, 4 layers unless said, vocab 49152, random weights, composed top-2; btx routes gate/up/down): `issue`
d2048/f8192 with 16 heads / 4 KV heads and E=4 (the Speed issue's table), `e8` and `e16` the same with 8 and 16
experts, `wide` d4096/f14336 (32 heads / 8 KV heads) with E=4, `small` SmolLM2-135M's shape (d576/f1536, 9 heads /
3 KV heads, 30 layers) with E=4. Rows, each against the dense model in the same run:

* forward and forward+backward (loss and all gradients) of `btx` and `traditional` at 8x1024 and 1x32 tokens, the
  peak memory of forward+backward at 8x1024, and (with `--compile`) `torch.compile(model)` forward+backward;
* training tokens/s (AdamW step included): router-only and full, against the dense model of equal active
  parameters (FFN width k x f) and the dense expert itself;
* greedy `generate()` tokens/s at batch 1 and 32 (32-token prompt, 128 new tokens, default dynamic cache), and at
  batch 1 with `cache_implementation="static"`.

Before timing, a composition whose every expert is a copy of the dense weights must give the dense logits: float32
relative error <= 1e-4, and in bf16 within twice the dense model's own bf16 rounding error; otherwise nothing is timed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _package_root() -> Path:
    """The checkout whose `moekit` is timed: this one, or `--package-root` (read before the import)."""
    if "--package-root" in sys.argv:
        return Path(sys.argv[sys.argv.index("--package-root") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


sys.path.insert(0, str(_package_root()))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from timing import environment, relative_error, synchronize, time_ms  # noqa: E402

from moekit import MixtureKitConfig, MixtureKitForCausalLM  # noqa: E402

COMMON = dict(layers=4, vocab=49152, shapes=[(8, 1024), (1, 32)], train_shape=(8, 1024), prompt=32, new_tokens=128,
              gen_batches=[1, 32], top_k=2)
SHAPES = {
    "issue": dict(COMMON, d=2048, f=8192, heads=16, kv_heads=4, experts=4),
    "e8": dict(COMMON, d=2048, f=8192, heads=16, kv_heads=4, experts=8),
    "e16": dict(COMMON, d=2048, f=8192, heads=16, kv_heads=4, experts=16),
    "wide": dict(COMMON, d=4096, f=14336, heads=32, kv_heads=8, experts=4),
    # SmolLM2-135M's shape (the quality study's seed): narrow matmuls, 30 blocks
    "small": dict(COMMON, d=576, f=1536, heads=9, kv_heads=3, experts=4, layers=30),
}
FULL = SHAPES["issue"]
QUICK = dict(d=64, f=128, layers=2, vocab=512, heads=4, kv_heads=2, shapes=[(2, 32), (1, 8)], train_shape=(2, 32),
             prompt=8, new_tokens=8, gen_batches=[1, 4], experts=4, top_k=2)


def llama_config(spec: dict, intermediate: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=spec["d"], intermediate_size=intermediate or spec["f"],
                       num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                       num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"], tie_word_embeddings=False,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def dense_model(spec: dict, device, dtype, intermediate: int | None = None):
    from transformers import LlamaForCausalLM

    with torch.device(device):
        return LlamaForCausalLM(llama_config(spec, intermediate)).to(dtype)


def composed_model(spec: dict, method: str, device, dtype, dense=None):
    config = MixtureKitConfig(text_config=llama_config(spec), method=method,
                              expert_names=[f"e{i}" for i in range(spec["experts"])], num_experts_per_tok=spec["top_k"],
                              router_layers=["gate_proj", "up_proj", "down_proj"] if method == "btx" else None)
    with torch.device(device):
        model = MixtureKitForCausalLM(config).to(dtype)
    if dense is not None:
        copy_dense_into(model, dense)
    return model


@torch.no_grad()
def copy_dense_into(model: MixtureKitForCausalLM, dense) -> None:
    """Every expert a copy of the dense weights; the shared weights the dense ones."""
    state = dense.state_dict()
    for name, tensor in model.state_dict().items():
        if name in state:
            tensor.copy_(state[name])
    for prefix, module in model.named_modules():
        for param_name, stack in getattr(module, "source_map", {}).items():
            target = model.get_parameter(f"{prefix}.{param_name}")
            source = torch.cat([state[f"{prefix}.{n}"] for n in stack.names], 0)
            target.copy_(source.unsqueeze(0).expand_as(target))


def correctness(spec: dict, device, dtype) -> dict[str, float]:
    """float32: a composition of identical experts must give the dense logits (<= 1e-4). In `dtype`, its error against
    the float32 dense model must be within twice the dense model's own rounding error in that dtype."""
    torch.manual_seed(0)
    dense = dense_model(spec, device, torch.float32).eval()
    ids = torch.randint(3, spec["vocab"], (2, 64), device=device)
    errors = {}
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        errors["dense rounding"] = relative_error(copy.deepcopy(dense).to(dtype)(input_ids=ids).logits, expected)
        for method in ("traditional", "btx"):
            model = composed_model(spec, method, device, torch.float32, dense).eval()
            errors[f"{method} fp32"] = relative_error(model(input_ids=ids).logits, expected)
            errors[f"{method} rounding"] = relative_error(model.to(dtype)(input_ids=ids).logits, expected)
            del model
    return errors


def correct(errors: dict[str, float]) -> bool:
    limit = 2 * errors["dense rounding"] + 1e-3
    return all(errors[f"{m} fp32"] <= 1e-4 and errors[f"{m} rounding"] <= limit for m in ("traditional", "btx"))


def _loss_backward(model, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()


def peak_memory_mb(fn, device) -> float | None:
    """Peak allocated device memory while `fn` runs (weights included), in MB; None on CPU."""
    if device.type != "cuda":
        return None
    gc.collect()  # models of earlier rows held in reference cycles count otherwise (measured: 4.2 GB, once)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e6


# Each measured row field (per model) and the name of its ratio to the dense model's.
RATIOS = {"fwd_ms": "fwd", "fwdbwd_ms": "fwdbwd", "fwdbwd_peak_mb": "fwdbwd_peak", "compiled_fwdbwd_ms": "compiled_fwdbwd"}


def forward_rows(spec: dict, device, dtype, compile_models: bool = False) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    models = {"dense": dense_model(spec, device, dtype), "btx": composed_model(spec, "btx", device, dtype),
              "traditional": composed_model(spec, "traditional", device, dtype)}
    for model in models.values():
        model.train()
        model.requires_grad_(True)
    for batch, length in spec["shapes"]:
        ids = torch.randint(3, spec["vocab"], (batch, length), device=device)
        row = dict(batch=batch, length=length)
        for name, model in models.items():
            def forward(model=model):
                with torch.no_grad():
                    model(input_ids=ids)

            def both(model=model):
                _loss_backward(model, ids)
                model.zero_grad(set_to_none=True)

            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = time_ms(forward, device), time_ms(both, device)
            if (batch, length) == spec["train_shape"]:
                row[f"{name}_fwdbwd_peak_mb"] = peak_memory_mb(both, device)
                if compile_models:
                    compiled = torch.compile(model)
                    row[f"{name}_compiled_fwdbwd_ms"] = time_ms(lambda: both(compiled), device)
                    del compiled
        for name in ("btx", "traditional"):
            for measure, ratio in RATIOS.items():
                if row.get(f"{name}_{measure}") is not None:
                    row[f"{name}_{ratio}_ratio"] = row[f"{name}_{measure}"] / row[f"dense_{measure}"]
        rows.append(row)
        print(f"{batch}x{length}: " + "  ".join(
            f"{n} fwd {row[f'{n}_fwd_ratio']:.2f}x fwd+bwd {row[f'{n}_fwdbwd_ratio']:.2f}x"
            + (f" peak mem {row[f'{n}_fwdbwd_peak_ratio']:.2f}x" if f"{n}_fwdbwd_peak_ratio" in row else "")
            + (f" compiled fwd+bwd {row[f'{n}_compiled_fwdbwd_ratio']:.2f}x"
               if f"{n}_compiled_fwdbwd_ratio" in row else "")
            for n in ("btx", "traditional")) + f"  (dense fwd {row['dense_fwd_ms']:.2f} ms, fwd+bwd "
            f"{row['dense_fwdbwd_ms']:.2f} ms)", flush=True)
    return rows


def flop_ideal(spec: dict) -> float:
    """btx / dense FLOPs per token (matmuls only): k copies of the FFN, attention and LM head once."""
    d, f, kv = spec["d"], spec["f"], spec["d"] * spec["kv_heads"] // spec["heads"]
    attention, ffn, head = 2 * d * d + 2 * d * kv, 3 * d * f, d * spec["vocab"]
    dense = spec["layers"] * (attention + ffn) + head
    return (spec["layers"] * (attention + spec["top_k"] * ffn) + head) / dense


def training_rows(spec: dict, device, dtype) -> list[dict]:
    batch, length = spec["train_shape"]
    ids = torch.randint(3, spec["vocab"], (batch, length), device=device)
    cases = [("dense expert, full", lambda: dense_model(spec, device, dtype), None),
             (f"dense equal active (f={spec['top_k'] * spec['f']}), full",
              lambda: dense_model(spec, device, dtype, spec["top_k"] * spec["f"]), None),
             ("btx, routers only", lambda: composed_model(spec, "btx", device, dtype), "routers"),
             ("btx, full", lambda: composed_model(spec, "btx", device, dtype), None),
             ("traditional, routers only", lambda: composed_model(spec, "traditional", device, dtype), "routers"),
             ("traditional, full", lambda: composed_model(spec, "traditional", device, dtype), None)]
    rows = []
    for label, build, only in cases:
        torch.manual_seed(0)
        model = build().train()
        model.requires_grad_(only is None)
        if only == "routers":
            for _, router in model.routers():
                router.requires_grad_(True)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type == "cuda")

        def step(model=model, optimizer=optimizer):
            _loss_backward(model, ids)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        ms = time_ms(step, device)
        rows.append(dict(case=label, step_ms=ms, tokens_per_s=batch * length / (ms * 1e-3),
                         trainable=sum(p.numel() for p in parameters)))
        print(f"train {label}: {batch * length / (ms * 1e-3):,.0f} tokens/s ({ms:.1f} ms/step)", flush=True)
        del model, optimizer, parameters
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


GENERATION_ROUNDS = 3


def generation_rows(spec: dict, device, dtype, kinds: tuple[str, ...] = ("dynamic", "static")) -> list[dict]:
    """Tokens/s of greedy `generate()` as a user calls it (dynamic cache), and with a static cache at batch 1: the
    median of `GENERATION_ROUNDS` turns in which dense, btx and traditional generate one after another."""
    rows = []
    torch.manual_seed(0)
    models = {"dense": dense_model(spec, device, dtype).eval(),
              "btx": composed_model(spec, "btx", device, dtype).eval(),
              "traditional": composed_model(spec, "traditional", device, dtype).eval()}
    settings = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False,
                    pad_token_id=0)
    cases = ([(batch, {}) for batch in spec["gen_batches"]] if "dynamic" in kinds else []) + (
        [(1, {"cache_implementation": "static"})] if "static" in kinds else [])
    for batch, extra in cases:
        prompt = torch.randint(3, spec["vocab"], (batch, spec["prompt"]), device=device)
        row = dict(batch=batch, **extra)
        for model in models.values():
            for _ in range(2 if extra else 1):  # warm-up (a static cache compiles the decoding step first)
                model.generate(prompt, **settings, **extra)
        samples = {name: [] for name in models}
        for _ in range(GENERATION_ROUNDS):  # the models take turns: host-bound decoding drifts within a call
            for name, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                model.generate(prompt, **settings, **extra)
                synchronize(device)
                samples[name].append(batch * spec["new_tokens"] / (time.perf_counter() - start))
        for name, rates in samples.items():
            row[f"{name}_tokens_per_s"] = statistics.median(rates)
            row[f"{name}_tokens_per_s_rounds"] = rates
        for name in ("btx", "traditional"):
            row[f"{name}_ratio"] = row[f"{name}_tokens_per_s"] / row["dense_tokens_per_s"]
        rows.append(row)
        print(f"generate batch {batch}{' ' + str(extra) if extra else ''}: "
              + "  ".join(f"{n} {row[f'{n}_tokens_per_s']:,.0f} tok/s" for n in models)
              + "  (" + ", ".join(f"{n} {row[f'{n}_ratio']:.2f}x" for n in ("btx", "traditional")) + ")", flush=True)
    return rows


def run_shape(name: str, spec: dict, device, dtype, compile_models: bool,
              rows: tuple[str, ...] = ("forward", "training", "generation"),
              generation: tuple[str, ...] = ("dynamic", "static")) -> dict:
    results = {"shape": name, "spec": spec, "flop_ideal_btx": flop_ideal(spec)}
    print(f"\n=== shape {name}: d{spec['d']} f{spec['f']} E{spec['experts']} k{spec['top_k']}", flush=True)
    results["correctness"] = errors = correctness(spec, device, dtype)
    print("relative error against the float32 dense model (identical experts): "
          + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()), flush=True)
    if not correct(errors):
        print("WRONG: composed models do not reproduce the dense model; nothing timed")
        raise SystemExit(1)
    print(f"FLOP ideal btx / dense: {results['flop_ideal_btx']:.2f}x", flush=True)
    if "forward" in rows:
        results["forward"] = forward_rows(spec, device, dtype, compile_models)
    if "training" in rows:
        results["training"] = training_rows(spec, device, dtype)
    if "generation" in rows:
        results["generation"] = generation_rows(spec, device, dtype, generation)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=["issue"], choices=sorted(SHAPES))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) forward+backward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--package-root", type=Path, help="time the moekit of another checkout")
    parser.add_argument("--rows", nargs="+", default=["forward", "training", "generation"],
                        choices=["forward", "training", "generation"])
    parser.add_argument("--generation", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"],
                        help="which generation rows: plain generate() at each batch, the static cache at batch 1")
    parser.add_argument("--few-token-limit-mib", type=float,
                        help="bytes of gathered expert weights up to which a decoding step skips the sort")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from moekit.runtime.compute import experts

    if args.few_token_limit_mib is not None:
        experts.FEW_TOKEN_COPY_LIMIT_BYTES = int(args.few_token_limit_mib * 2**20)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import moekit

    results = {"environment": environment(device), "command": " ".join(sys.argv),
               "few_token_copy_limit_bytes": experts.FEW_TOKEN_COPY_LIMIT_BYTES,
               "package": str(Path(moekit.__file__).parent), "shapes": []}
    print(results["environment"], "| moekit from", results["package"], flush=True)
    shapes = {"quick": QUICK} if args.quick else {name: SHAPES[name] for name in args.shapes}
    for name, spec in shapes.items():
        results["shapes"].append(run_shape(name, spec, device, dtype, args.compile, tuple(args.rows),
                                           tuple(args.generation)))
        if args.json:  # written after every shape, so a run stopped at its time limit keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
