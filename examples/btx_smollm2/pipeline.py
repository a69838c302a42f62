"""Does composing help? Branch SmolLM2-135M into domain experts, compose them three ways, train what composing
adds, and compare against the dense and sparse-upcycling baselines on the same token budget.

    python examples/btx_smollm2/pipeline.py --data DIR --gguf SmolLM2.gguf --workdir /tmp/btx --out results/
    python examples/btx_smollm2/pipeline.py --data DIR --model FOLDER ...      # any Llama-family HF folder

Steps (each model saved under --workdir; nothing is downloaded):
1. seed: SmolLM2 (the GGUF, dequantised once to safetensors) or --model;
2. experts: the seed trained on each domain for --expert-tokens tokens (all parameters);
3. dense data-matched: the seed trained on the mixed data for N x expert-tokens + moe-tokens tokens;
4. compositions through `mixturekit.compose`: traditional (top-2) and btx (top-2) of the N experts plus the seed;
   bts with the seed as hub and the N experts as streams; sparse upcycling = traditional of N+1 copies of the seed;
5. MoE stage on the mixed data: traditional/btx train routers + attention (+ norms and embeddings, the shared
   weights) for --moe-tokens; bts trains its stitches for --moe-tokens; sparse upcycling trains everything for the
   same total budget as the dense baseline (its experts start identical, so they must train to differ);
6. evaluation: per-domain and mixed validation perplexity of every model, per-layer routing by domain, a results
   table (Markdown + JSON), a plot, and the routing report of the best composed model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mixturekit import MixtureKitForCausalLM, apply_freeze_policy, compose  # noqa: E402

ROUTER_NAMES = ("router", "gate.weight", "stitches")  # parameters that get the higher learning rate


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Data:
    """Token streams per domain; training windows sampled at random, validation blocks fixed."""

    def __init__(self, folder: Path, seq_len: int, validation_blocks: int):
        meta = json.loads((folder / "data.json").read_text())
        arrays = np.load(folder / "data.npz")
        self.domains: list[str] = meta["domains"]
        self.seq_len = seq_len
        self.train = {d: torch.from_numpy(arrays[f"{d}_train"].astype(np.int64)) for d in self.domains}
        self.validation = {}
        for domain in self.domains:
            stream = torch.from_numpy(arrays[f"{domain}_validation"].astype(np.int64))
            count = min(validation_blocks, stream.numel() // seq_len)
            self.validation[domain] = stream[: count * seq_len].view(count, seq_len)

    def batches(self, domains: list[str], tokens: int, batch_size: int, seed: int):
        """Batches of windows, the domains interleaved equally, until `tokens` tokens."""
        generator = torch.Generator().manual_seed(seed)
        steps = max(1, tokens // (batch_size * self.seq_len))
        for step in range(steps):
            rows = []
            for row in range(batch_size):
                stream = self.train[domains[(step * batch_size + row) % len(domains)]]
                start = int(torch.randint(0, stream.numel() - self.seq_len, (1,), generator=generator))
                rows.append(stream[start:start + self.seq_len])
            yield step, steps, torch.stack(rows)


def trainable_groups(model: torch.nn.Module, lr: float, router_lr: float) -> list[dict]:
    fast, slow = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (fast if any(key in name for key in ROUTER_NAMES) else slow).append(parameter)
    return [group for group in ({"params": slow, "lr": lr}, {"params": fast, "lr": router_lr}) if group["params"]]


def train(model, data: Data, domains: list[str], tokens: int, args, lr: float, router_lr: float, seed: int,
          label: str) -> list[float]:
    """AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA; returns the loss of every step."""
    groups = trainable_groups(model, lr, router_lr)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    base = [group["lr"] for group in optimizer.param_groups]
    model.train()
    losses, start = [], time.perf_counter()
    device = next(model.parameters()).device
    for step, steps, batch in data.batches(domains, tokens, args.batch_size, seed):
        warm = min(1.0, (step + 1) / max(1, steps // 10))
        for group, lr0 in zip(optimizer.param_groups, base):
            group["lr"] = lr0 * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    log(f"trained {label}: {len(losses)} steps, {len(losses) * args.batch_size * data.seq_len:,} tokens, "
        f"loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}, {seconds:.0f} s")
    return losses


@torch.no_grad()
def perplexities(model, data: Data, batch_size: int) -> dict[str, float]:
    """Token-level perplexity from the logits (a composed model's auxiliary loss does not count); `mixed` weighs the
    domains equally (the mean of their mean negative log-likelihoods)."""
    model.eval()
    device = next(model.parameters()).device
    nll = {}
    for domain, blocks in data.validation.items():
        total, count = 0.0, 0
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=batch).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
        nll[domain] = total / count
    result = {domain: math.exp(value) for domain, value in nll.items()}
    result["mixed"] = math.exp(sum(nll.values()) / len(nll))
    return result


@torch.no_grad()
def routing_by_domain(model: MixtureKitForCausalLM, data: Data, batch_size: int) -> dict:
    """Per router, per domain: the share of the domain's routed slots (token x k) that go to each expert."""
    model.eval()
    device = next(model.parameters()).device
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    shares: dict[str, dict[str, list[float]]] = {}
    for domain, blocks in data.validation.items():
        counts: dict[str, torch.Tensor] = {}
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                output = model(input_ids=batch, output_router_logits=True)
            for name, logits in zip(model.router_recorder.names, output.router_logits):
                chosen = logits.float().topk(k, dim=-1).indices.reshape(-1)
                counts[name] = counts.get(name, 0) + torch.bincount(chosen, minlength=experts).cpu()
        for name, count in counts.items():
            shares.setdefault(name, {})[domain] = (count.float() / count.sum()).tolist()
    return shares


def load(folder: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)


def save(model, folder: Path, tokenizer_from: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    for path in tokenizer_from.iterdir():  # the tokenizer travels with every checkpoint (compose checks it)
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(path, folder / path.name)
    return folder


def seed_folder(args) -> Path:
    if args.model:
        return args.model
    from mixturekit import convert_gguf

    return convert_gguf(args.gguf, cache_dir=args.workdir / "gguf-cache")


def compose_all(args, seed: Path, experts: dict[str, Path]) -> dict[str, Path]:
    names = list(experts)
    members = [{"name": n, "source": str(p)} for n, p in experts.items()] + [{"name": "seed", "source": str(seed)}]
    common = {"num_experts_per_tok": 2, "router_init": "random", "alpha": args.alpha, "dtype": "float32",
              "seed": args.seed}
    recipes = {
        "traditional": {"method": "traditional", "experts": members, **common},
        "btx": {"method": "btx", "experts": members, **common},
        "bts": {"method": "bts", "base": {"name": "seed", "source": str(seed)},
                "experts": [{"name": n, "source": str(experts[n])} for n in names], "dtype": "float32",
                "seed": args.seed, "stitch_freq": args.stitch_freq},
        "sparse upcycling": {"method": "traditional", "experts": [{"name": f"copy{i}", "source": str(seed)}
                                                                  for i in range(len(names) + 1)], **common},
    }
    outputs = {}
    for label, recipe in recipes.items():
        outputs[label] = compose(recipe, output=args.workdir / "composed" / label.replace(" ", "-"), overwrite=True,
                                 progress=False)
        log(f"composed {label}")
    return outputs


def markdown_table(results: dict[str, dict[str, float]], domains: list[str]) -> str:
    columns = domains + ["mixed"]
    best = {c: min(r[c] for r in results.values()) for c in columns}
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, row in results.items():
        cells = [f"**{row[c]:.3f}**" if row[c] == best[c] else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def specialisation(shares: dict, expert_names: list[str], domains: list[str]) -> dict[str, list[float]]:
    """Per domain, per router (in order): the share of its slots at the expert branched on it."""
    return {d: [router[d][expert_names.index(d)] for router in shares.values()] for d in domains if d in expert_names}


def plot(results: dict, domains: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    columns = domains + ["mixed"]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(results)
    for i, (model, row) in enumerate(results.items()):
        axis.bar([c + i * width for c in range(len(columns))], [row[c] for c in columns], width, label=model)
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    axis.set_yscale("log")
    axis.set_ylabel("validation perplexity (log scale, lower is better)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with data.npz and data.json (prepare.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file")
    source.add_argument("--model", type=Path, help="a dense Hugging Face folder to use as the seed")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="results folder (small files only)")
    parser.add_argument("--expert-tokens", type=int, default=1_000_000)
    parser.add_argument("--moe-tokens", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-blocks", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--router-lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--stitch-freq", type=int, default=4)
    parser.add_argument("--moe-policy", choices=["routers+attention", "full"], default="routers+attention",
                        help="what traditional/btx train in the MoE stage (the BTX paper trains everything)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the experts and the dense baseline already trained in --workdir (ablations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = Data(args.data, args.seq_len, args.validation_blocks)
    domains = data.domains
    started = time.perf_counter()
    seed = seed_folder(args)
    log(f"seed: {seed}")
    results, curves = {}, {}
    model = load(seed, device)
    results["seed"] = perplexities(model, data, args.batch_size)
    del model
    experts = {}
    for index, domain in enumerate(domains):
        folder = args.workdir / "experts" / domain
        if args.reuse and (folder / "config.json").is_file():
            model = load(folder, device)
        else:
            model = load(seed, device)
            curves[f"expert {domain}"] = train(model, data, [domain], args.expert_tokens, args, args.lr, args.lr,
                                               args.seed + 1 + index, f"expert {domain}")
            save(model, folder, seed)
        results[f"expert {domain}"] = perplexities(model, data, args.batch_size)
        experts[domain] = folder
        del model
    total_tokens = len(domains) * args.expert_tokens + args.moe_tokens
    folder = args.workdir / "dense-data-matched"
    if args.reuse and (folder / "config.json").is_file():
        model = load(folder, device)
    else:
        model = load(seed, device)
        curves["dense data-matched"] = train(model, data, domains, total_tokens, args, args.lr, args.lr,
                                             args.seed + 10, "dense data-matched")
        save(model, folder, seed)
    results["dense data-matched"] = perplexities(model, data, args.batch_size)
    del model
    composed = compose_all(args, seed, experts)
    routing, trained = {}, {}
    stages = {"sparse upcycling": ("full", total_tokens), "traditional": (args.moe_policy, args.moe_tokens),
              "btx": (args.moe_policy, args.moe_tokens), "bts": ("stitches", args.moe_tokens)}
    for label, (policy, tokens) in stages.items():
        model = MixtureKitForCausalLM.from_pretrained(composed[label], dtype=torch.float32).to(device)
        if label in ("traditional", "btx", "bts"):
            results[f"{label} (as composed)"] = perplexities(model, data, args.batch_size)
        apply_freeze_policy(model, policy)
        curves[label] = train(model, data, domains, tokens, args, args.lr, args.router_lr, args.seed + 20, label)
        results[label] = perplexities(model, data, args.batch_size)
        if model.config.method != "bts":
            routing[label] = routing_by_domain(model, data, args.batch_size)
        trained[label] = save(model, args.workdir / "trained" / label.replace(" ", "-"), seed)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    order = ["seed"] + [f"expert {d}" for d in domains] + ["dense data-matched", "sparse upcycling",
                                                          "traditional (as composed)", "traditional",
                                                          "btx (as composed)", "btx", "bts (as composed)", "bts"]
    results = {name: results[name] for name in order}
    composed_names = ["traditional", "btx", "bts"]
    best = min(composed_names, key=lambda name: results[name]["mixed"])
    expert_names = domains + ["seed"]
    special = {label: specialisation(routing[label], expert_names, domains) for label in ("traditional", "btx")}
    import transformers

    summary = {
        "results": results, "best_composed": best, "specialisation": special, "routing": routing,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "total_tokens_dense": total_tokens,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0],
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
        "seconds": time.perf_counter() - started, "loss_curves": curves,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(results, domains)
    lines = [table, "", "Share of each domain's routed slots at the expert branched on it, per layer "
             "(mean over the layers' routers; min–max):", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for label, per_domain in special.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{np.mean(v):.1%} ({min(v):.0%}–{max(v):.0%})" for v in per_domain.values()) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)
    plot(results, domains, args.out / "perplexity.png")
    try:  # the routing report of the best composed model, on the start of each domain's validation text
        from transformers import AutoTokenizer

        from mixturekit import capture_routing, write_report

        tokenizer = AutoTokenizer.from_pretrained(trained[best])
        texts = [tokenizer.decode(data.validation[d][0][:160]) for d in domains]
        model = MixtureKitForCausalLM.from_pretrained(trained[best]).to(device)
        trace = capture_routing(model, tokenizer, texts, list(domains), max_tokens=160)
        write_report(trace, args.out / "routing-report.html", title=f"Routing of the SmolLM2 {best} model")
    except Exception as error:  # noqa: BLE001 - the table is the result; the report is a view of it
        log(f"routing report not written: {type(error).__name__}: {error}")
    log(f"done in {time.perf_counter() - started:.0f} s; best composed model: {best}")


if __name__ == "__main__":
    main()
