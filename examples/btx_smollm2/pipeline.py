"""Does composing help? Branch SmolLM2-135M into domain experts, then compare what a user holding those experts can
do with the same budget of further training: keep the best expert, merge the experts' weights (linear, TIES), or
compose them with MixtureKit (traditional, btx, with and without the seed as an expert; bts), against the seed, the
dense data-matched model and sparse upcycling.

    python examples/btx_smollm2/pipeline.py --data DIR --gguf SmolLM2.gguf --workdir /tmp/btx --out results/
    python examples/btx_smollm2/pipeline.py --data DIR --model FOLDER ...      # any Llama-family HF folder
    python examples/btx_smollm2/pipeline.py ... --stage experts      # then baselines, moe, eval: one call each

Stages (`--stage`, default `all`; each saves what the next needs under --workdir and records every model's
perplexities, tokens and GPU-seconds in `--workdir/ledger.json` as soon as it is trained, so a stage cut short by a
time limit resumes with `--reuse` and the study fits several device calls):
1. experts: the seed's perplexity; the seed trained on each domain for --expert-tokens tokens (all parameters);
2. baselines: with --moe-tokens of further training on the mixed data each (all parameters): the best single expert
   continued; the linear average of the experts; their TIES merge (task vectors from the seed, `moekit.merge_experts`).
   References: dense data-matched (the seed trained on the mixed data for N x expert-tokens + moe-tokens) and sparse
   upcycling (traditional of N+1 copies of the seed, trained in full for the same total);
3. moe: compositions through `moekit.compose` trained --moe-tokens on the mixed data (--moe-policy): traditional
   and btx (top-2) of the N experts with and without the seed; bts (the seed as hub, the N experts as streams; its
   stitches train). With --alpha-study also traditional at alpha 0, 0.1 and alpha_mode auto (the main runs use
   --alpha), with utilisation and dead experts per setting;
4. eval: the tables (Markdown + JSON), the per-domain view against each domain's expert, a plot, inference latency of
   traditional against btx, and the routing report of the best composition.
`scaling.py` beside this file plots several budgets' results.json together.

A single model's training longer than one device call (the 20M budget's dense model, sparse upcycling from 10M) is
cut with `--pause-after SECONDS`: when the process has run that long, the model being trained saves its training state
(weights, optimiser, losses, step) under `--workdir/paused/` and the run stops cleanly; the same command with
`--reuse` continues it from that step, with the result of an uninterrupted run.
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
from moekit import (  # noqa: E402
    AutoAlphaCallback, MixtureKitForCausalLM, apply_freeze_policy, compose, merge_experts,
)

STAGES = ("experts", "baselines", "moe", "eval")
ROUTER_NAMES = ("router", "gate.weight", "stitches")  # parameters that get the higher learning rate
DEAD_SHARE = 0.1  # an expert is dead under a tenth of the uniform share of a router's slots (moekit's rule)


class Paused(Exception):
    """A training stopped at `--pause-after`, its state saved for `--reuse` to continue."""


def paused_state(args, label: str) -> Path:
    return args.workdir / "paused" / (label.replace(", ", "-").replace(" ", "-") + ".pt")


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


class Ledger:
    """Every model's measurements, written to disk after each one, so stages run in separate calls."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, label: str) -> bool:
        return label in self.entries

    def record(self, label: str, **values) -> None:
        self.entries.setdefault(label, {}).update(values)
        self.path.write_text(json.dumps(self.entries, indent=1) + "\n", encoding="utf-8")


def trainable_groups(model: torch.nn.Module, lr: float, router_lr: float) -> list[dict]:
    fast, slow = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (fast if any(key in name for key in ROUTER_NAMES) else slow).append(parameter)
    return [group for group in ({"params": slow, "lr": lr}, {"params": fast, "lr": router_lr}) if group["params"]]


def train(model, data: Data, domains: list[str], tokens: int, args, lr: float, router_lr: float, seed: int,
          label: str) -> dict:
    """AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA; the loss of every step, tokens and seconds.
    A model with `alpha_mode: auto` has its alpha adapted after every step, as `moekit train` does.

    Past `args.pause_at` (a `time.perf_counter()` deadline, None for none) it saves its state at the next step and
    raises `Paused`; with `args.reuse`, a saved state of `label` is loaded first and training goes on from its step
    (the batches before it are drawn, not trained on, so every later batch is the one an uninterrupted run sees)."""
    groups = trainable_groups(model, lr, router_lr)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95), fused=device.type == "cuda")
    base = [group["lr"] for group in optimizer.param_groups]
    controller = AutoAlphaCallback()
    state_path, first_step, earlier_seconds, losses, alphas = paused_state(args, label), 0, 0.0, [], []
    if getattr(args, "reuse", False) and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, earlier_seconds, alphas, controller.alpha = (state["step"], state["seconds"], state["alphas"],
                                                                 state["alpha"])
        losses = [torch.tensor(value) for value in state["losses"]]
        log(f"resuming {label} at step {first_step} ({earlier_seconds:.0f} s trained before)")
    controller.attach(model)
    model.train()
    # --compile: dense models only (one graph, reused by every dense model of the process); a composition's routing
    # makes shapes that change from step to step
    forward = (torch.compile(model) if getattr(args, "compile", False) and not isinstance(model, MixtureKitForCausalLM)
               else model)
    pause_at = getattr(args, "pause_at", None)
    synchronize(device)
    start = time.perf_counter()
    for step, steps, batch in data.batches(domains, tokens, args.batch_size, seed):
        if step < first_step:
            continue
        if pause_at is not None and step > first_step and time.perf_counter() >= pause_at:
            synchronize(device)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            partial = state_path.with_suffix(".partial")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "seconds": earlier_seconds + time.perf_counter() - start, "alphas": alphas,
                        "alpha": controller.alpha, "losses": torch.stack(losses).float().cpu().tolist()}, partial)
            partial.replace(state_path)  # whole or absent: a call killed while saving leaves the previous state
            controller.detach()
            raise Paused(f"paused {label} at step {step} of {steps}: run the same command with --reuse to continue")
        warm = min(1.0, (step + 1) / max(1, steps // 10))
        for group, lr0 in zip(optimizer.param_groups, base):
            group["lr"] = lr0 * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.step()
        losses.append(loss.detach())
        if controller.alpha is not None:
            alphas.append(controller.alpha)
    synchronize(device)
    seconds = earlier_seconds + time.perf_counter() - start
    controller.detach()
    state_path.unlink(missing_ok=True)
    losses = torch.stack(losses).float().cpu().tolist()
    trained = len(losses) * args.batch_size * data.seq_len
    log(f"trained {label}: {len(losses)} steps, {trained:,} tokens, loss {losses[0]:.3f} -> "
        f"{np.mean(losses[-5:]):.3f}, {seconds:.0f} s ({trained / seconds:,.0f} tokens/s)")
    result = {"loss_curve": losses, "train_tokens": trained, "train_seconds": seconds}
    if alphas:
        result["alpha_curve"] = alphas
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def utilisation(shares: dict) -> dict:
    """Over the mixed validation set (domains weighted equally): per router the load per expert, its normalised
    entropy, and the experts under the dead threshold; summed up over the routers."""
    loads = {name: np.mean([per_domain[d] for d in per_domain], axis=0) for name, per_domain in shares.items()}
    experts = len(next(iter(loads.values())))
    threshold = DEAD_SHARE / experts

    def entropy(load):
        return float(-sum(p * math.log(p) for p in load if p > 0) / math.log(experts))

    dead = {name: [i for i, p in enumerate(load) if p < threshold] for name, load in loads.items()}
    return {"mean_load_entropy": float(np.mean([entropy(load) for load in loads.values()])),
            "max_load": float(max(load.max() for load in loads.values())),
            "dead_slots": sum(len(d) for d in dead.values()), "routers": len(loads),
            "routers_with_dead_experts": sum(1 for d in dead.values() if d), "dead_threshold": threshold}


def load(folder: Path, device: torch.device, **config_overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **config_overrides).to(device)


def save(model, folder: Path, tokenizer_from: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    for path in tokenizer_from.iterdir():  # the tokenizer travels with every checkpoint (compose checks it)
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(path, folder / path.name)
    return folder


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seed_folder(args) -> Path:
    if args.model:
        return args.model
    from moekit import convert_gguf

    return convert_gguf(args.gguf, cache_dir=args.workdir / "gguf-cache")


class Study:
    """One budget of the study: the data, the seed, the ledger and the settings every stage shares."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.data = Data(args.data, args.seq_len, args.validation_blocks)
        self.domains = self.data.domains
        self.ledger = Ledger(args.workdir / "ledger.json")
        self.seed = seed_folder(args)
        self.total_tokens = len(self.domains) * args.expert_tokens + args.moe_tokens

    def expert_folder(self, domain: str) -> Path:
        return self.args.workdir / "experts" / domain

    def experts(self) -> dict[str, Path]:
        folders = {d: self.expert_folder(d) for d in self.domains}
        missing = [d for d, folder in folders.items() if not (folder / "config.json").is_file()]
        if missing:
            raise SystemExit(f"no trained expert for {', '.join(missing)} under {self.args.workdir / 'experts'}: run "
                             f"--stage experts first with the same --workdir")
        return folders

    def done(self, label: str) -> bool:
        return self.args.reuse and label in self.ledger and "perplexity" in self.ledger.entries[label]

    def evaluate(self, label: str, model, **extra) -> None:
        self.ledger.record(label, perplexity=perplexities(model, self.data, self.args.batch_size), **extra)
        log(f"{label}: mixed perplexity {self.ledger.entries[label]['perplexity']['mixed']:.3f}")

    def fit(self, label: str, model, domains: list[str], tokens: int, seed: int, router_lr: float | None = None,
            built_from_experts: bool = True) -> None:
        """Train, evaluate and record one model; what it cost includes the experts it was built from."""
        result = train(model, self.data, domains, tokens, self.args, self.args.lr,
                       self.args.router_lr if router_lr is None else router_lr, seed, label)
        self.evaluate(label, model, built_from_experts=built_from_experts, **result)


def stage_experts(study: Study) -> None:
    args, ledger = study.args, study.ledger
    if not study.done("seed"):
        study.evaluate("seed", load(study.seed, study.device), train_tokens=0, train_seconds=0.0,
                       built_from_experts=False)
    for index, domain in enumerate(study.domains):
        label, folder = f"expert {domain}", study.expert_folder(domain)
        if study.done(label) and (folder / "config.json").is_file():
            continue
        model = load(study.seed, study.device)
        study.fit(label, model, [domain], args.expert_tokens, args.seed + 1 + index, args.lr, built_from_experts=False)
        ledger.record(label, domain=domain)
        save(model, folder, study.seed)
        del model
        release(study.device)


def stage_baselines(study: Study) -> None:
    """The user's alternatives to composing (each trained --moe-tokens on the mixed data) and the references."""
    args, domains, device = study.args, study.domains, study.device
    work = args.workdir / "merged"
    if not study.done("dense data-matched"):
        study.fit("dense data-matched", load(study.seed, device), domains, study.total_tokens, args.seed + 10,
                  built_from_experts=False)
        release(device)
    if not study.done("best expert, continued"):
        experts = study.experts()
        best = min(domains, key=lambda d: study.ledger.entries[f"expert {d}"]["perplexity"]["mixed"])
        study.fit("best expert, continued", load(experts[best], device), domains, args.moe_tokens, args.seed + 11)
        study.ledger.record("best expert, continued", expert=best)
        release(device)
    merges = {"linear merge": {"method": "linear"}, "ties merge": {"method": "ties", "base": study.seed,
                                                                  "density": args.ties_density}}
    for index, (label, options) in enumerate(merges.items()):
        if study.done(label):
            continue
        folder = merge_experts(list(study.experts().values()), work / label.replace(" ", "-"), dtype="float32",
                               overwrite=True, progress=False, **options)
        model = load(folder, device)
        study.evaluate(f"{label} (as merged)", model, train_tokens=0, train_seconds=0.0, built_from_experts=True)
        study.fit(label, model, domains, args.moe_tokens, args.seed + 12 + index)
        del model
        release(device)
        shutil.rmtree(folder)
    if not study.done("sparse upcycling"):
        recipe = {"method": "traditional", "num_experts_per_tok": 2, "router_init": "random", "alpha": args.alpha,
                  "dtype": "float32", "seed": args.seed,
                  "experts": [{"name": f"copy{i}", "source": str(study.seed)} for i in range(len(domains) + 1)]}
        folder = compose(recipe, output=work / "sparse-upcycling", overwrite=True, progress=False)
        model = MixtureKitForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        apply_freeze_policy(model, "full")  # its experts start identical, so they must train to differ
        study.fit("sparse upcycling", model, domains, study.total_tokens, args.seed + 20, built_from_experts=False)
        del model
        release(device)
        shutil.rmtree(folder)


def composition_recipes(study: Study) -> dict[str, dict]:
    args, experts = study.args, study.experts()
    members = [{"name": d, "source": str(p)} for d, p in experts.items()]
    seed = [{"name": "seed", "source": str(study.seed)}]
    common = {"num_experts_per_tok": 2, "router_init": "random", "alpha": args.alpha, "dtype": "float32",
              "seed": args.seed}
    return {
        "traditional": {"method": "traditional", "experts": members + seed, **common},
        "btx": {"method": "btx", "experts": members + seed, **common},
        "traditional, no seed": {"method": "traditional", "experts": members, **common},
        "btx, no seed": {"method": "btx", "experts": members, **common},
        "bts": {"method": "bts", "base": seed[0], "experts": members, "dtype": "float32", "seed": args.seed,
                "stitch_freq": args.stitch_freq},
    }


ALPHA_STUDY = {"traditional, alpha 0": {"alpha": 0.0}, "traditional, alpha 0.1": {"alpha": 0.1},
               "traditional, alpha auto": {"alpha_mode": "auto"}}


def stage_moe(study: Study) -> None:
    args, domains, device = study.args, study.domains, study.device
    composed_dir, trained_dir = args.workdir / "composed", args.workdir / "trained"
    recipes = composition_recipes(study)
    runs = {label: (label, {}) for label in recipes}
    if args.alpha_study:  # the same composition as `traditional`, loaded with another balance setting
        runs.update({label: ("traditional", overrides) for label, overrides in ALPHA_STUDY.items()})
    for label, (composition, overrides) in runs.items():
        if study.done(label):
            continue
        folder = composed_dir / composition.replace(" ", "-").replace(",", "")
        if not (folder / "config.json").is_file():
            compose(recipes[composition], output=folder, overwrite=True, progress=False)
            log(f"composed {composition}")
        model = MixtureKitForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides).to(device)
        if not overrides:
            study.evaluate(f"{label} (as composed)", model, train_tokens=0, train_seconds=0.0,
                           built_from_experts=True)
        policy = "stitches" if model.config.method == "bts" else args.moe_policy
        apply_freeze_policy(model, policy)
        study.fit(label, model, domains, args.moe_tokens, args.seed + 30)
        study.ledger.record(label, policy=policy, overrides=overrides)
        if model.config.method != "bts":
            shares = routing_by_domain(model, study.data, args.batch_size)
            study.ledger.record(label, routing=shares, utilisation=utilisation(shares),
                                experts=list(model.config.expert_names))
        if label in ("traditional", "btx", "bts"):  # kept for the latency rows and the routing report
            save(model, trained_dir / label, study.seed)
        del model
        release(device)


@torch.no_grad()
def latency(folder: Path, device: torch.device, prompt: torch.Tensor, new_tokens: int, rounds: int = 3) -> dict:
    """Inference cost in bf16: a forward of 8 x 512 tokens (ms) and greedy `generate()` at batch 1 (tokens/s),
    median of `rounds` after a warm-up."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    block = torch.randint(0, model.config.get_text_config().vocab_size, (8, 512), device=device)

    def timed(work) -> float:
        work()
        times = []
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            work()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    forward = timed(lambda: model(input_ids=block))
    generate = timed(lambda: model.generate(prompt.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            do_sample=False, pad_token_id=0))
    del model
    release(device)
    return {"forward_8x512_ms": forward * 1e3, "generate_tokens_per_s": new_tokens / generate}


def cost(entries: dict, label: str) -> tuple[int, float]:
    """Training tokens and GPU-seconds behind a model, its experts' training included where it was built from them."""
    experts = [e for e in entries.values() if "domain" in e]
    tokens, seconds = entries[label].get("train_tokens", 0), entries[label].get("train_seconds", 0.0)
    if entries[label].get("built_from_experts"):
        tokens += sum(e["train_tokens"] for e in experts)
        seconds += sum(e["train_seconds"] for e in experts)
    return tokens, seconds


def markdown_table(results: dict[str, dict[str, float]], columns: list[str], digits: int = 3,
                   bold_lowest: bool = True) -> str:
    best = {c: min(r[c] for r in results.values() if c in r) if bold_lowest else None for c in columns}
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, row in results.items():
        cells = [("–" if c not in row else f"**{row[c]:.{digits}f}**" if row[c] == best[c] else f"{row[c]:.{digits}f}")
                 for c in columns]
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
    figure, axis = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(results)
    for i, (model, row) in enumerate(results.items()):
        axis.bar([c + i * width for c in range(len(columns))], [row[c] for c in columns], width, label=model)
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    axis.set_yscale("log")
    axis.set_ylabel("validation perplexity (log scale, lower is better)")
    axis.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def display_order(labels: list[str]) -> list[str]:
    """References first, then the user's alternatives, then the compositions, each after its starting point."""
    groups = ("seed", "expert ", "best expert", "linear merge", "ties merge", "traditional", "btx", "bts",
              "dense data-matched", "sparse upcycling")

    def rank(label: str) -> tuple[int, bool, str, bool]:
        group = next(i for i, prefix in enumerate(groups + ("",)) if label.startswith(prefix))
        return group, "alpha" in label, label.split(" (as ")[0], "(as " not in label

    return sorted(labels, key=rank)


def stage_eval(study: Study) -> None:
    args, domains, entries = study.args, study.domains, study.ledger.entries
    results = {label: entries[label]["perplexity"] for label in display_order(list(entries))
               if "perplexity" in entries[label]}
    costs = {label: dict(zip(("total_train_tokens", "gpu_seconds"), cost(entries, label))) for label in results}
    trained_dir = args.workdir / "trained"
    composed = [label for label in ("traditional", "btx", "bts") if (trained_dir / label / "config.json").is_file()]
    if "traditional" in composed and "btx" in composed and not args.skip_latency:
        prompt = study.data.validation[domains[0]][:1, :32]
        for label, folder in {"seed": study.seed, "traditional": trained_dir / "traditional",
                              "btx": trained_dir / "btx"}.items():
            if not (study.done(label) and "latency" in entries[label]):
                study.ledger.record(label, latency=latency(folder, study.device, prompt, args.latency_tokens))
                log(f"latency {label}: {entries[label]['latency']}")
    timing = {label: entries[label]["latency"] for label in ("seed", "traditional", "btx")
              if "latency" in entries.get(label, {})}
    special = {}
    for label, entry in entries.items():
        if "routing" in entry:
            special[label] = specialisation(entry["routing"], entry["experts"], domains)
    import transformers

    summary = {
        "results": results, "costs": costs, "specialisation": special, "latency": timing,
        "utilisation": {label: entry["utilisation"] for label, entry in entries.items() if "utilisation" in entry},
        "routing": {label: entry["routing"] for label, entry in entries.items() if "routing" in entry},
        "alpha_curves": {label: entry["alpha_curve"] for label, entry in entries.items() if "alpha_curve" in entry},
        "best_expert": next((entry["expert"] for entry in entries.values() if "expert" in entry), None),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "total_tokens_dense": study.total_tokens,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0],
                     "device": torch.cuda.get_device_name() if study.device.type == "cuda" else "cpu"},
        "loss_curves": {label: entry["loss_curve"] for label, entry in entries.items() if "loss_curve" in entry},
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    lines = ["Validation perplexity (lower is better):", "", markdown_table(results, domains + ["mixed"]), "",
             "Cost: training tokens and GPU-seconds behind each model (the experts' included where it was built "
             "from them):", "",
             markdown_table({k: {"tokens (M)": v["total_train_tokens"] / 1e6, "GPU-s": v["gpu_seconds"]}
                             for k, v in costs.items()}, ["tokens (M)", "GPU-s"], digits=1, bold_lowest=False)]
    experts = {d: results[f"expert {d}"][d] for d in domains if f"expert {d}" in results}
    if experts:
        relative = {label: {d: row[d] / experts[d] for d in experts} for label, row in results.items()
                    if not label.startswith("expert ")}
        lines += ["", "Per domain, perplexity relative to that domain's expert (1.00 = as good as the expert on its "
                  "own domain; lower is better):", "", markdown_table(relative, list(experts), digits=2)]
    if special:
        lines += ["", "Share of each domain's routed slots at the expert branched on it, per layer (mean over the "
                  "routers; min–max):", "", "| model | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
        for label, per_domain in special.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{np.mean(v):.1%} ({min(v):.0%}–{max(v):.0%})" for v in per_domain.values()) + " |")
    if summary["utilisation"]:
        lines += ["", "Utilisation on the mixed validation set (load entropy 1 = balanced; dead = under "
                  f"{DEAD_SHARE:g}/E of a router's slots):", "",
                  "| model | mean load entropy | max load | dead (router, expert) pairs | routers with a dead expert |",
                  "|---|---:|---:|---:|---:|"]
        for label, u in summary["utilisation"].items():
            lines.append(f"| {label} | {u['mean_load_entropy']:.3f} | {u['max_load']:.1%} | {u['dead_slots']} | "
                         f"{u['routers_with_dead_experts']} of {u['routers']} |")
    if timing:
        lines += ["", "Inference (bf16): forward of 8 x 512 tokens, greedy generate() at batch 1:", "",
                  "| model | forward ms | generate tokens/s |", "|---|---:|---:|"]
        lines += [f"| {label} | {t['forward_8x512_ms']:.1f} | {t['generate_tokens_per_s']:.0f} |"
                  for label, t in timing.items()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)
    plot(results, domains, args.out / "perplexity.png")
    candidates = [label for label in composed if label in results]
    if candidates:
        best = min(candidates, key=lambda label: results[label]["mixed"])
        write_routing_report(study, trained_dir / best, best)


def write_routing_report(study: Study, folder: Path, label: str) -> None:
    """The routing report of one trained composition, on the start of each domain's validation text."""
    try:
        from transformers import AutoTokenizer

        from moekit import capture_routing, write_report

        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts = [tokenizer.decode(study.data.validation[d][0][:160]) for d in study.domains]
        model = MixtureKitForCausalLM.from_pretrained(folder).to(study.device)
        trace = capture_routing(model, tokenizer, texts, list(study.domains), max_tokens=160)
        write_report(trace, study.args.out / "routing-report.html", title=f"Routing of the SmolLM2 {label} model")
    except Exception as error:  # noqa: BLE001 - the table is the result; the report is a view of it
        log(f"routing report not written: {type(error).__name__}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with data.npz and data.json (prepare.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file")
    source.add_argument("--model", type=Path, help="a dense Hugging Face folder to use as the seed")
    parser.add_argument("--workdir", type=Path, required=True, help="one folder per budget (models and ledger.json)")
    parser.add_argument("--out", type=Path, required=True, help="results folder (small files only)")
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all")
    parser.add_argument("--expert-tokens", type=int, default=1_000_000)
    parser.add_argument("--moe-tokens", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--validation-blocks", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--router-lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--alpha-study", action="store_true", help="also traditional at alpha 0, 0.1 and auto")
    parser.add_argument("--ties-density", type=float, default=0.2)
    parser.add_argument("--stitch-freq", type=int, default=4)
    parser.add_argument("--moe-policy", choices=["routers+attention", "full"], default="full",
                        help="what traditional/btx train in the MoE stage (the BTX paper trains everything)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip every model the workdir's ledger already holds (resume a stage, add ablations)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the dense models' training (the first one pays the compile time)")
    parser.add_argument("--latency-tokens", type=int, default=64)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pause-after", type=float, metavar="SECONDS",
                        help="save the model in training and stop once the process has run this long (a device "
                        "call's limit); --reuse continues it")
    args = parser.parse_args()
    args.pause_at = None if args.pause_after is None else time.perf_counter() + args.pause_after
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = Study(args)
    log(f"seed: {study.seed}; domains: {', '.join(study.domains)}")
    stages = {"experts": stage_experts, "baselines": stage_baselines, "moe": stage_moe, "eval": stage_eval}
    for name in STAGES if args.stage == "all" else (args.stage,):
        try:
            stages[name](study)
        except Paused as paused:
            log(f"{paused} ({time.perf_counter() - started:.0f} s)")
            return
        log(f"stage {name} done at {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
