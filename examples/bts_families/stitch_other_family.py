"""BTS across model families: stitch SmolLM2-135M (Llama) to an expert of another family trained from scratch with
SmolLM2's tokenizer on one domain, train the stitches, and compare perplexity against the hub and the expert.

    # data and SmolLM2 as for the btx reproduction (examples/btx_smollm2/prepare.py: code, german, arithmetic)
    python examples/btx_smollm2/prepare.py --out .carry/btx_smollm2
    python examples/bts_families/stitch_other_family.py --data .carry/btx_smollm2 --gguf SmolLM2.gguf \\
        --workdir /tmp/bts-families --out results/bts_families            # or --model FOLDER for the hub
    python examples/bts_families/stitch_other_family.py --quick --workdir /tmp/bts-quick --out /tmp/bts-quick/out

Steps (nothing is downloaded):
1. hub: SmolLM2 (its GGUF dequantised once to safetensors) or --model; --quick: a tiny Llama trained for a few
   steps on all domains, with a byte-level BPE tokenizer trained here;
2. expert: a model of --expert-family (default qwen3) with its own width and depth (--expert-hidden,
   --expert-layers), initialised at random and trained from scratch on --expert-domain only, saved with the hub's
   tokenizer files (so `compose` compares the vocabularies and accepts it);
3. `moekit.compose` with method bts: the hub plus the expert as a stream, a stitch every --stitch-freq hub
   blocks; as composed it must give the hub's perplexity (the stitches start as the identity);
4. the stitches alone trained on all domains for --stitch-tokens tokens (hub and expert frozen);
5. per-domain and mixed validation perplexity of hub, expert, bts as composed and bts trained: results.md (a
   Markdown table) and results.json (with settings, versions, loss curves and seconds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from moekit import MixtureKitForCausalLM, apply_freeze_policy, compose  # noqa: E402


def _btx_pipeline():
    """The SmolLM2 reproduction's data loader, training loop and perplexity (one implementation for both)."""
    spec = importlib.util.spec_from_file_location("btx_smollm2_pipeline", ROOT / "examples/btx_smollm2/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


btx = _btx_pipeline()
log = btx.log


def quick_setup(args) -> tuple[Path, Path]:
    """--quick: the three demo domains, a tokenizer trained on them, and a tiny Llama hub trained briefly on all of
    them; returns (data folder in prepare.py's format, hub folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moekit.demo.domains import build_domains
    from moekit.demo.tiny_experts import train_tokenizer

    domains = build_domains(seed=args.seed, chars_per_domain=20_000)
    tokenizer = train_tokenizer([t for d in domains.values() for t in d.train], 320)
    data = args.workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, domain in domains.items():
        for split in ("train", "validation"):
            ids: list[int] = []
            for document in getattr(domain, split):
                ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            arrays[f"{name}_{split}"] = np.asarray(ids, dtype=np.uint16)
    np.savez_compressed(data / "data.npz", **arrays)
    (data / "data.json").write_text(json.dumps({"domains": list(domains), "vocab_size": len(tokenizer)}) + "\n")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    hub = LlamaForCausalLM(config)
    btx.train(hub, btx.Data(data, args.seq_len, args.validation_blocks), list(domains), args.hub_tokens, args,
              3e-3, 3e-3, args.seed, "quick hub")
    folder = args.workdir / "hub"
    hub.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return data, folder


def expert_config(args, hub_config):
    """A config of --expert-family with the hub's vocabulary and special tokens and the expert's own shape."""
    from transformers import AutoConfig

    heads = args.expert_heads
    if args.expert_hidden % heads:
        raise SystemExit(f"--expert-hidden {args.expert_hidden} is not a multiple of --expert-heads {heads}")
    return AutoConfig.for_model(
        args.expert_family, vocab_size=hub_config.vocab_size, hidden_size=args.expert_hidden,
        intermediate_size=args.expert_intermediate or 8 * args.expert_hidden // 3,
        num_hidden_layers=args.expert_layers, num_attention_heads=heads,
        num_key_value_heads=args.expert_kv_heads or heads, head_dim=args.expert_hidden // heads,
        max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=True,
        bos_token_id=hub_config.bos_token_id, eos_token_id=hub_config.eos_token_id,
        pad_token_id=hub_config.pad_token_id,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and data on the CPU, end to end (minutes)")
    parser.add_argument("--data", type=Path, help="folder with data.npz and data.json (btx_smollm2/prepare.py)")
    parser.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file (the hub)")
    parser.add_argument("--model", type=Path, help="a dense Hugging Face folder to use as the hub")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="results folder (small files only)")
    parser.add_argument("--expert-family", default="qwen3", help="model_type of the expert (qwen3, gemma3_text, "
                        "mistral, olmo2, phi3, ...: any causal-LM family bts runs as a stream)")
    parser.add_argument("--expert-domain", default="code")
    parser.add_argument("--expert-hidden", type=int, default=384)
    parser.add_argument("--expert-layers", type=int, default=12)
    parser.add_argument("--expert-heads", type=int, default=6)
    parser.add_argument("--expert-kv-heads", type=int, default=2)
    parser.add_argument("--expert-intermediate", type=int, default=1024)
    parser.add_argument("--expert-tokens", type=int, default=20_000_000)
    parser.add_argument("--expert-lr", type=float, default=1e-3)
    parser.add_argument("--stitch-tokens", type=int, default=4_000_000)
    parser.add_argument("--stitch-lr", type=float, default=1e-3)
    parser.add_argument("--stitch-freq", type=int, default=6)
    parser.add_argument("--hub-tokens", type=int, default=8_192, help="--quick only: the tiny hub's training")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-blocks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.device = "cpu"
        for name, value in dict(expert_hidden=48, expert_layers=3, expert_heads=4, expert_kv_heads=2,
                                expert_intermediate=96, expert_tokens=8_192, stitch_tokens=4_096, stitch_freq=1,
                                seq_len=64, batch_size=8, validation_blocks=4, expert_lr=3e-3,
                                stitch_lr=3e-2).items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    elif args.data is None or (args.gguf is None) == (args.model is None):
        parser.error("give --data and one of --gguf or --model (or --quick)")
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.quick:
        data_folder, hub_folder = quick_setup(args)
    else:
        data_folder, hub_folder = args.data, btx.seed_folder(args)
    data = btx.Data(data_folder, args.seq_len, args.validation_blocks)
    if args.expert_domain not in data.domains:
        raise SystemExit(f"--expert-domain '{args.expert_domain}' is not in the data; valid: {data.domains}")
    results, curves, seconds = {}, {}, {}
    hub = btx.load(hub_folder, device)
    results["hub"] = btx.perplexities(hub, data, args.batch_size)
    log(f"hub {hub.config.model_type} ({hub_folder}): {results['hub']}")

    from transformers import AutoModelForCausalLM

    config = expert_config(args, hub.config)
    del hub
    torch.manual_seed(args.seed + 1)
    expert = AutoModelForCausalLM.from_config(config).to(device)
    log(f"expert: {config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} blocks, "
        f"{sum(p.numel() for p in expert.parameters()) / 1e6:.1f}M parameters, from scratch on {args.expert_domain}")
    trained = btx.train(expert, data, [args.expert_domain], args.expert_tokens, args, args.expert_lr, args.expert_lr,
                        args.seed + 1, f"expert {config.model_type}")
    curves["expert"], seconds["expert"] = trained["loss_curve"], trained["train_seconds"]
    results[f"expert ({config.model_type}, {args.expert_domain})"] = btx.perplexities(expert, data, args.batch_size)
    expert_folder = btx.save(expert, args.workdir / "expert", hub_folder)  # with the hub's tokenizer files
    del expert

    recipe = {"method": "bts", "base": {"name": "hub", "source": str(hub_folder)},
              "experts": [{"name": args.expert_domain, "source": str(expert_folder)}], "dtype": "float32",
              "stitch_freq": args.stitch_freq, "seed": args.seed}
    composed = compose(recipe, output=args.workdir / "composed", overwrite=True, progress=False)
    model = MixtureKitForCausalLM.from_pretrained(composed, dtype=torch.float32).to(device)
    results["bts (as composed)"] = btx.perplexities(model, data, args.batch_size)
    initial_gap = max(abs(results["bts (as composed)"][c] / results["hub"][c] - 1) for c in results["hub"])
    log(f"bts as composed vs hub: largest relative perplexity difference {initial_gap:.2e}")
    if args.quick and initial_gap > 1e-4:
        raise SystemExit(f"bts as composed differs from its hub (relative {initial_gap:.2e}): the identity is broken")
    apply_freeze_policy(model, "stitches")
    trained = btx.train(model, data, data.domains, args.stitch_tokens, args, args.stitch_lr, args.stitch_lr,
                        args.seed + 2, "bts stitches")
    curves["bts"], seconds["bts stitches"] = trained["loss_curve"], trained["train_seconds"]
    results["bts (stitches trained)"] = btx.perplexities(model, data, args.batch_size)
    btx.save(model, args.workdir / "trained", hub_folder)
    import transformers

    summary = {
        "results": results, "initial_relative_gap": initial_gap,
        "expert": {"model_type": config.model_type, "hidden_size": config.hidden_size,
                   "num_hidden_layers": config.num_hidden_layers, "domain": args.expert_domain},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
        "seconds": time.perf_counter() - started, "train_seconds": seconds, "loss_curves": curves,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    table = btx.markdown_table(results, data.domains + ["mixed"])
    (args.out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table, flush=True)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
