"""Layer benchmark: one MoE FFN layer, ours against the baselines, forward and forward+backward.

    python bench/layer_benchmark.py [--json out.json]            # GPU, bf16, the issue's shapes
    python bench/layer_benchmark.py --quick --device cpu         # CPU, fp32, tiny shapes (a smoke run)

For each shape (d, f), number of experts E, top-k and token count it times: (a) one dense FFN, (b) our traditional
block, (c) transformers' `MixtralSparseMoeBlock` with its grouped_mm experts, (d) the per-expert mask loop of the
original MixtureKit (bench/moe_baselines.py), (e) our btx block (gate, up and down each routed). Then (f) a BTS model of
S streams against S dense models. Before timing, every implementation is checked against a float32 `loop` reference
of the same weights and routing (bf16 relative error <= 1e-2); a wrong one is reported and not timed.

Ratios printed: ours / (k x dense), btx / ours, mask-loop / ours, Mixtral / ours; TFLOP/s of ours against the
bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_baselines import (  # noqa: E402
    MaskLoopMoe, btx_block, copy_traditional_into, dense_ffn, experts_given_routing, hf_mixtral_block, routing_of,
    traditional_block,
)
from timing import environment, matmul_peak_tflops, relative_error, time_ms  # noqa: E402

from moekit.runtime.routed.routed_linear import RoutedLinear  # noqa: E402

FULL = dict(shapes=[(2048, 8192), (4096, 14336)], experts=[2, 4, 8], top_k=[1, 2], tokens=[32, 512, 8192],
            many_experts=[(2048, 8192, 32)], bts=dict(d=2048, f=8192, layers=4, streams=[2, 4], tokens=[(8, 1024)]))
QUICK = dict(shapes=[(64, 128)], experts=[2, 4], top_k=[1, 2], tokens=[1, 64], many_experts=[(64, 128, 16)],
             bts=dict(d=64, f=128, layers=4, streams=[2, 3], tokens=[(2, 16)]))
TOLERANCE = 1e-2


def _set_backend(block: torch.nn.Module, backend: str) -> None:
    for module in block.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def check(blocks: dict, d: int, device, dtype) -> dict[str, float]:
    """Relative error of each implementation against a float32 loop copy of our block, on one routing."""
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(512, d, device=device, dtype=dtype, generator=generator)
    errors = {}
    with torch.no_grad():
        reference = copy.deepcopy(blocks["traditional"]).float()
        _set_backend(reference, "loop")
        weights, indices = routing_of(reference, tokens.float())
        expected = experts_given_routing(reference, tokens.float(), indices, weights)
        errors["traditional"] = relative_error(blocks["traditional"](tokens), reference(tokens.float()))
        errors["mask-loop"] = relative_error(blocks["mask-loop"](tokens), reference(tokens.float()))
        if "mixtral" in blocks:
            errors["mixtral"] = relative_error(experts_given_routing(blocks["mixtral"], tokens, indices, weights),
                                               expected)
        # btx: each routed projection against its float32 loop copy on the same input (routing is then identical).
        worst, hidden = 0.0, tokens
        for name in ("gate_proj", "up_proj", "down_proj"):
            routed: RoutedLinear = getattr(blocks["btx"], name)
            if name == "down_proj":
                hidden = torch.randn(512, routed.in_features, device=device, dtype=dtype, generator=generator)
            twin = copy.deepcopy(routed).float()
            twin.backend = "loop"
            worst = max(worst, relative_error(routed(hidden), twin(hidden.float())))
        errors["btx"] = worst
    return errors


def _timings(block, tokens: torch.Tensor, device) -> tuple[float, float]:
    upstream = torch.randn_like(tokens)
    batched = type(block).__name__ == "MixtralSparseMoeBlock"  # it takes [batch, sequence, d] only

    def run():
        return block(tokens.unsqueeze(0)).squeeze(0) if batched else block(tokens)

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():  # gradients set to None each step, as an optimizer's zero_grad does
        run().backward(upstream)
        tokens.grad = None
        block.zero_grad(set_to_none=True)

    forward_ms = time_ms(forward, device)
    tokens.requires_grad_(True)
    both_ms = time_ms(forward_backward, device)
    tokens.requires_grad_(False)
    block.zero_grad(set_to_none=True)
    return forward_ms, both_ms


def layer_rows(settings: dict, device, dtype, with_mixtral: bool) -> list[dict]:
    rows = []
    cases = [(d, f, e, k) for d, f in settings["shapes"] for e in settings["experts"] for k in settings["top_k"]]
    cases += [(d, f, e, k) for d, f, e in settings["many_experts"] for k in settings["top_k"]]
    for d, f, experts, top_k in cases:
        torch.manual_seed(0)
        with torch.device(device):
            blocks = {"dense": dense_ffn(d, f), "traditional": traditional_block(d, f, experts, top_k),
                      "mask-loop": MaskLoopMoe(d, f, experts, top_k), "btx": btx_block(d, f, experts, top_k)}
            if with_mixtral:
                try:
                    blocks["mixtral"] = hf_mixtral_block(d, f, experts, top_k)
                except Exception as error:  # an older transformers without the experts interface
                    print(f"  (no Mixtral row: {error})")
        for name in ("mask-loop", "mixtral"):
            if name in blocks:
                copy_traditional_into(blocks["traditional"], blocks[name])
        blocks = {name: block.to(dtype) for name, block in blocks.items()}
        errors = check(blocks, d, device, dtype)
        wrong = {name for name, error in errors.items() if not error <= TOLERANCE}
        print(f"d{d} f{f} E{experts} k{top_k}: relative errors "
              + ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
              + (f"  WRONG, not timed: {sorted(wrong)}" if wrong else ""))
        for count in settings["tokens"]:
            tokens = torch.randn(count, d, device=device, dtype=dtype)
            row = dict(d=d, f=f, experts=experts, top_k=top_k, tokens=count, errors=errors)
            for name, block in blocks.items():
                if name in wrong:
                    continue
                row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = _timings(block, tokens, device)
            rows.append(row)
            print("  " + _format_row(row), flush=True)
        del blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _ratio(row: dict, numerator: str, denominator: str, mode: str, scale: float = 1.0) -> float | None:
    top, bottom = row.get(f"{numerator}_{mode}_ms"), row.get(f"{denominator}_{mode}_ms")
    return top / (bottom * scale) if top is not None and bottom else None


def _format_row(row: dict) -> str:
    parts = [f"T{row['tokens']}"]
    for mode in ("fwd", "fwdbwd"):
        parts.append(f"{mode}: dense {row['dense_' + mode + '_ms']:.3f} ms, ours {row['traditional_' + mode + '_ms']:.3f}")
        for label, value in (("ours/(k*dense)", _ratio(row, "traditional", "dense", mode, row["top_k"])),
                             ("btx/ours", _ratio(row, "btx", "traditional", mode)),
                             ("maskloop/ours", _ratio(row, "mask-loop", "traditional", mode)),
                             ("mixtral/ours", _ratio(row, "mixtral", "traditional", mode))):
            if value is not None:
                parts.append(f"{label} {value:.2f}")
    return "  ".join(parts)


def _tflops(row: dict, mode: str) -> float:
    flops = 2 * row["tokens"] * row["top_k"] * 3 * row["d"] * row["f"] * (3 if mode == "fwdbwd" else 1)
    return flops / (row[f"traditional_{mode}_ms"] * 1e-3) / 1e12


def markdown(rows: list[dict], peak: float) -> str:
    def cell(value):
        return "—" if value is None else f"{value:.2f}"

    lines = [f"bf16 matmul peak measured in this run: {peak:.0f} TFLOP/s", "",
             "| d / f | E | k | tokens | mode | dense ms | ours ms | ours / (k×dense) | btx / ours | mask-loop / ours "
             "| Mixtral / ours | ours TFLOP/s |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for mode in ("fwd", "fwdbwd"):
            lines.append(
                f"| {row['d']} / {row['f']} | {row['experts']} | {row['top_k']} | {row['tokens']} | "
                f"{'fwd' if mode == 'fwd' else 'fwd+bwd'} | {row['dense_' + mode + '_ms']:.3f} | "
                f"{row['traditional_' + mode + '_ms']:.3f} | "
                f"{cell(_ratio(row, 'traditional', 'dense', mode, row['top_k']))} | "
                f"{cell(_ratio(row, 'btx', 'traditional', mode))} | {cell(_ratio(row, 'mask-loop', 'traditional', mode))} | "
                f"{cell(_ratio(row, 'mixtral', 'traditional', mode))} | {_tflops(row, mode):.0f} |")
    return "\n".join(lines)


def bts_rows(settings: dict, device, dtype) -> list[dict]:
    """(f) A BTS model of S streams (hub + S-1 experts, 4 blocks) against S forward passes of the dense model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moekit import MixtureKitConfig, MixtureKitForCausalLM

    spec, rows = settings["bts"], []
    config = LlamaConfig(hidden_size=spec["d"], intermediate_size=spec["f"], num_hidden_layers=spec["layers"],
                         num_attention_heads=max(1, spec["d"] // 128), num_key_value_heads=max(1, spec["d"] // 256),
                         vocab_size=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(config).to(dtype).eval()
    for streams in spec["streams"]:
        for stitches in ([spec["layers"] - 1], list(range(0, spec["layers"], 1))):
            with torch.device(device):
                model = MixtureKitForCausalLM(MixtureKitConfig(
                    text_config=config, method="bts", expert_names=[f"e{i}" for i in range(streams - 1)],
                    expert_configs=[config] * (streams - 1), stitch_layers_index=stitches)).to(dtype).eval()
            model.dense_model.load_state_dict(dense.state_dict())
            for batch, length in spec["tokens"]:
                ids = torch.randint(0, 1024, (batch, length), device=device)
                with torch.no_grad():
                    exact = torch.equal(model(input_ids=ids).logits, dense(input_ids=ids).logits)
                if not exact:
                    print(f"BTS S={streams}: at initialisation the logits differ from the hub's: WRONG, not timed")
                    continue

                def bts_forward():
                    with torch.no_grad():
                        model(input_ids=ids)

                def dense_forwards():
                    with torch.no_grad():
                        for _ in range(streams):
                            dense(input_ids=ids)

                bts_ms, dense_ms = time_ms(bts_forward, device), time_ms(dense_forwards, device)
                row = dict(streams=streams, stitches=len(stitches), tokens=batch * length, bts_ms=bts_ms,
                           s_dense_ms=dense_ms, ratio=bts_ms / dense_ms)
                rows.append(row)
                print(f"BTS S={streams} stitches={len(stitches)} tokens={batch * length}: {bts_ms:.2f} ms vs "
                      f"S x dense {dense_ms:.2f} ms = {bts_ms / dense_ms:.3f}", flush=True)
            del model
    return rows


def compiled_rows(device, dtype) -> list[dict]:
    """Our traditional block under `torch.compile`, at one shape (optional: reported, never required)."""
    rows = []
    d, f, experts, top_k = 2048, 8192, 8, 2
    torch.manual_seed(0)
    with torch.device(device):
        block = traditional_block(d, f, experts, top_k).to(dtype)
    compiled = torch.compile(block)
    for count in (512, 8192):
        tokens = torch.randn(count, d, device=device, dtype=dtype)
        with torch.no_grad():
            error = relative_error(compiled(tokens), block(tokens))
        eager = _timings(block, tokens, device)
        fast = _timings(compiled, tokens, device)
        rows.append(dict(tokens=count, error=error, eager_fwd_ms=eager[0], eager_fwdbwd_ms=eager[1],
                         compiled_fwd_ms=fast[0], compiled_fwdbwd_ms=fast[1]))
        print(f"compiled traditional d{d} E{experts} k{top_k} T{count}: error {error:.1e}; fwd {eager[0]:.3f} -> "
              f"{fast[0]:.3f} ms, fwd+bwd {eager[1]:.3f} -> {fast[1]:.3f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--compile", action="store_true", help="also time our block under torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = QUICK if args.quick else FULL
    print(environment(device), flush=True)
    peak = matmul_peak_tflops(device, dtype, 8192 if device.type == "cuda" else 512)
    print(f"matmul peak {peak:.0f} TFLOP/s", flush=True)
    results = {"environment": environment(device), "peak_tflops": peak, "command": " ".join(sys.argv)}
    results["layers"] = layer_rows(settings, device, dtype, with_mixtral=True)
    results["bts"] = bts_rows(settings, device, dtype)
    if args.compile:
        try:
            results["compiled"] = compiled_rows(device, dtype)
        except Exception:
            results["compiled_error"] = traceback.format_exc(limit=3)
            print("torch.compile failed:\n" + results["compiled_error"])
    print()
    print(markdown(results["layers"], peak))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    wrong = [row for row in results["layers"] if any(not e <= TOLERANCE for e in row["errors"].values())]
    raise SystemExit(1 if wrong else 0)


if __name__ == "__main__":
    main()
