"""Lifecycle study (issue #39) on the quality study's data and experts: is a composition usable as composed when
its routers are fitted from a small sample of each domain (`router_init: data`, no training step), and what does
pruning 5 -> 4 -> 3 experts by routing statistics cost?

    python bench/lifecycle_study.py --data DIR --gguf SmolLM2.gguf --workdir /tmp/btx-e5M --out docs/results/lifecycle \\
        --expert-tokens 5000000 --reuse

DIR is what `examples/btx_smollm2/prepare.py --domains german,french,c,python ...` writes (the study's data, see
docs/results.md). With the study's --workdir and --reuse the trained experts are taken from its ledger and folders;
otherwise they are trained first (the seed on each domain for --expert-tokens, as the study does; at 5M tokens that
is most of the run's time). Then, with no MoE-stage training:
- "traditional, data router, top-1" and "top-2": the four experts composed with routers fitted from
  --router-sequences windows of --router-length tokens of each domain's training stream;
- "traditional, oracle routing": the top-1 composition with every expert but the domain's opted out for each
  domain (no mixed reading): the gap to the experts that the averaged attention and embeddings leave, routing aside;
- "btx over attention and FFN, data router, top-1": every Linear of a block routed, nothing averaged but the
  embeddings, norms and head;
- "traditional + seed, random router": the study's "as composed" row (5 experts, top-2), for comparison;
- "traditional + seed, data router": 5 experts (the seed's sample: the four domains' windows mixed), top-2,
  then pruned by routed-slot share over a mixed sample of training windows to 4 and to 3 experts (`moekit edit
  --prune`).
--rows picks groups (data: the two data-router rows; oracle; btx-attention; seed: the seed rows and pruning).
Every model's held-out perplexity per domain and mixed (the study's `perplexities`), the share of each domain's
routed slots that reach its own expert, and the time each step took go to --out/results.json and results.md, with
each domain's ratio to its own expert and the issue's goal (every domain within 1.1x of its expert, mixed below
every single expert's) checked.

Smoke on a CPU with a tiny model: --model TINY_FOLDER --data TINY_DATA --expert-tokens 20000 --seq-len 64
--router-sequences 4 --router-length 32 --validation-blocks 2 --batch-size 4 --device cpu.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "btx_smollm2"))
from moekit import compose  # noqa: E402
from moekit.editing import prune_experts  # noqa: E402
from moekit.editing.router_fit import fit_routers_from_data  # noqa: E402
from pipeline import Study, load, log, perplexities, release, routing_by_domain, stage_experts  # noqa: E402

GOAL_RATIO = 1.1
ROWS = ("data", "oracle", "btx-attention", "seed")


def windows(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """`count` random windows of `length` tokens of a training stream, seeded."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length, (count,), generator=generator)
    return stream[starts[:, None] + torch.arange(length)]


def own_expert_share(shares: dict, experts: list[str], domains: list[str]) -> dict[str, float]:
    """Per domain, the share of its routed slots (over every router) that reach the expert of the same name."""
    result = {}
    for domain in domains:
        if domain in experts:
            per_router = [per_domain[domain][experts.index(domain)] for per_domain in shares.values()]
            result[domain] = sum(per_router) / len(per_router)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path)
    source.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--expert-tokens", type=int, default=5_000_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-blocks", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--router-sequences", type=int, default=64, help="windows per domain for the router fit")
    parser.add_argument("--router-length", type=int, default=256, help="tokens per window for the router fit")
    parser.add_argument("--prune-sequences", type=int, default=32, help="windows per domain to count routing on")
    parser.add_argument("--reuse", action="store_true", help="take experts the workdir's ledger already holds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="which groups of rows to build (default: all)")
    args = parser.parse_args()
    # what the pipeline's Study and training read beside these
    args.moe_tokens, args.router_lr, args.compile, args.pause_at = 0, 1e-3, False, None
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = Study(args)
    stage_experts(study)  # trains only the experts the ledger lacks (with --reuse)
    experts, domains, device = study.experts(), study.domains, study.device
    expert_ppl = {d: study.ledger.entries[f"expert {d}"]["perplexity"] for d in domains}
    log(f"experts ready at {time.perf_counter() - started:.0f} s")

    samples = {d: windows(study.data.train[d], args.router_sequences, args.router_length, args.seed + 50 + i)
               for i, d in enumerate(domains)}
    per_domain = max(1, args.router_sequences // len(domains))
    samples["seed"] = torch.cat([s[:per_domain] for s in samples.values()])
    prune_data = torch.cat([windows(study.data.train[d], args.prune_sequences, args.router_length, args.seed + 70 + i)
                            for i, d in enumerate(domains)])
    members = [{"name": d, "source": str(p)} for d, p in experts.items()]
    seed_member = [{"name": "seed", "source": str(study.seed)}]
    work = args.workdir / "lifecycle"
    if work.exists():
        shutil.rmtree(work)
    results: dict[str, dict] = {}

    def measure(label: str, folder: Path, seconds: float) -> None:
        model = load(folder, device)
        ppl = perplexities(model, study.data, args.batch_size)
        shares = routing_by_domain(model, study.data, args.batch_size)
        names = list(model.config.expert_names)
        results[label] = {"perplexity": ppl, "experts": names, "seconds_to_build": seconds,
                          "own_expert_share": own_expert_share(shares, names, domains),
                          "edits": model.config.edits}
        log(f"{label}: mixed {ppl['mixed']:.3f}, " + ", ".join(f"{d} {ppl[d]:.2f}" for d in domains))
        del model
        release(device)

    def composed(label: str, experts_list: list[dict], k: int, router_init: str, method: str = "traditional",
                 router_layers: list[str] | None = None, keep: bool = True) -> Path:
        begin = time.perf_counter()
        recipe = {"method": method, "experts": experts_list, "num_experts_per_tok": k, "dtype": "float32",
                  "seed": args.seed, "router_init": "random" if router_init == "data" else router_init}
        if router_layers:
            recipe["router_layers"] = router_layers
        folder = compose(recipe, output=work / label.replace(" ", "-").replace(",", ""), progress=False)
        if router_init == "data":  # compose's router_init: data, with the samples as token ids on the device
            names = [e["name"] for e in experts_list]
            fitted = fit_routers_from_data(folder, {n: samples[n] for n in names}, folder.with_name(folder.name + "-fit"),
                                           record=False, limit=args.router_sequences, device=str(device))
            shutil.rmtree(folder)
            folder = fitted
        if keep:
            measure(label, folder, time.perf_counter() - begin)
        return folder

    def oracle(label: str, folder: Path) -> None:
        """Each domain read with every other expert opted out: its tokens all reach its own expert, so what is left
        of the gap to the expert is the averaged shared weights, not the routing."""
        model = load(folder, device)
        ppl: dict[str, float | None] = {"mixed": None}
        for domain in domains:
            model.disable_experts([n for n in model.config.expert_names if n != domain])
            ppl[domain] = perplexities(model, study.data, args.batch_size)[domain]
            model.enable_experts(list(model.config.expert_names))
        results[label] = {"perplexity": ppl, "experts": list(model.config.expert_names), "seconds_to_build": 0.0,
                          "own_expert_share": {d: 1.0 for d in domains}, "edits": []}
        log(f"{label}: " + ", ".join(f"{d} {ppl[d]:.2f}" for d in domains))
        del model
        release(device)

    if "data" in args.rows or "oracle" in args.rows:
        top1 = composed("traditional, data router, top-1", members, 1, "data", keep="data" in args.rows)
        if "oracle" in args.rows:
            oracle("traditional, oracle routing (others opted out), top-1", top1)
    if "data" in args.rows:
        composed("traditional, data router, top-2", members, 2, "data")
    if "btx-attention" in args.rows:  # every Linear of a block routed: no averaged attention left
        composed("btx over attention and FFN, data router, top-1", members, 1, "data", method="btx",
                 router_layers=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if "seed" in args.rows:
        composed("traditional + seed, random router", members + seed_member, 2, "random")
        five = composed("traditional + seed, data router", members + seed_member, 2, "data")
    current, count = (five, len(members) + 1) if "seed" in args.rows else (None, 0)
    for remaining in (count - 1, count - 2) if "seed" in args.rows else ():  # 5 -> 4 -> 3 with four domains
        begin = time.perf_counter()
        current, usage = prune_experts(current, 1, prune_data, work / f"pruned-{remaining}", device=str(device))
        label = f"traditional + seed, data router, pruned to {remaining}"
        log(f"{label}: usage " + ", ".join(f"{n} {s:.3f}" for n, s in usage.items()))
        measure(label, current, time.perf_counter() - begin)
        results[label]["usage_before"] = usage

    best_single = min(expert_ppl[d]["mixed"] for d in domains)
    lines = ["| model | " + " | ".join(domains) + " | mixed | own-expert share |",
             "| --- |" + " --- |" * (len(domains) + 2)]
    for d in domains:
        ppl = expert_ppl[d]
        lines.append(f"| expert {d} | " + " | ".join(f"{ppl[x]:.2f}" for x in domains) + f" | {ppl['mixed']:.2f} | |")
    for label, row in results.items():
        ppl, share = row["perplexity"], row["own_expert_share"]
        ratios = " | ".join(f"{ppl[d]:.2f} ({ppl[d] / expert_ppl[d][d]:.2f}x)" for d in domains)
        mean_share = f"{sum(share.values()) / len(share):.2f}" if share else ""
        mixed = "—" if ppl["mixed"] is None else f"{ppl['mixed']:.2f}"  # the oracle row has no mixed reading
        lines.append(f"| {label} | {ratios} | {mixed} | {mean_share} |")
        row["goal_every_domain_within_1.1x"] = all(ppl[d] <= GOAL_RATIO * expert_ppl[d][d] for d in domains)
        row["goal_mixed_below_every_expert"] = ppl["mixed"] is not None and ppl["mixed"] < best_single
    lines += ["", "Goals (issue #39): " + "; ".join(
        f"{label}: within 1.1x {'yes' if row['goal_every_domain_within_1.1x'] else 'no'}, mixed below every expert "
        f"{'yes' if row['goal_mixed_below_every_expert'] else 'no'}" for label, row in results.items())]
    settings = {k: str(v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "experts": expert_ppl,
                                                       "models": results}, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
