"""Balancing on the toy task: utilisation and held-out perplexity for alpha, alpha_mode auto and balance: bias.

The demo's quick tiny experts (three domains) are trained once, composed as `traditional` (top-2 of 3) once per
setting, their routers trained with the same data, steps and seed, then scored on the validation text.

    PYTHONPATH=. python bench/balance_study.py --workdir /tmp/balance_study
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moekit import compose
from moekit.demo.domains import DOMAIN_NAMES
from moekit.demo.run import QUICK, _domains, load_model, train_all
from moekit.demo.tiny_experts import encode_documents, validation_blocks
from moekit.evaluation import perplexity
from moekit.runtime.routed.routing_stats import dead_threshold
from moekit.runtime.routed.balance import router_sums
from moekit.training import train_routers

SETTINGS = {
    "alpha 0": {"alpha": 0.0},
    "alpha 0.01": {"alpha": 0.01},
    "alpha 0.1": {"alpha": 0.1},
    "alpha 0.01, auto": {"alpha": 0.01, "alpha_mode": "auto"},
    "bias, alpha 0": {"alpha": 0.0, "balance": "bias", "balance_bias_rate": 0.01},
    "bias, alpha 0.01": {"alpha": 0.01, "balance": "bias", "balance_bias_rate": 0.01},
}


def loads(model, blocks: torch.Tensor) -> torch.Tensor:
    """Share of routed slots per expert `[routers, E]` on `blocks`, with each router's selection bias."""
    with torch.no_grad():
        output = model(input_ids=blocks, output_router_logits=True)
    biases = model.routing_biases()
    counts = torch.stack([router_sums(logits, model.config.num_experts_per_tok, expert_bias=biases.get(name)).slots
                          for name, logits in zip(model.router_recorder.names, output.router_logits)])
    return counts / counts.sum(-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/balance_study"))
    parser.add_argument("--steps", type=int, default=40)
    arguments = parser.parse_args()
    torch.set_num_threads(2)
    settings = replace(QUICK, router_steps=arguments.steps)
    workdir = arguments.workdir
    domains = _domains(True, settings.seed)
    paths, _ = train_all(workdir, domains, settings, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths["seed"])
    streams = [encode_documents(tokenizer, domain.train) for domain in domains.values()]
    generator = torch.Generator().manual_seed(settings.seed)
    train = torch.cat([stream[torch.randint(0, stream.numel() - settings.seq_len, (settings.router_windows,),
                                            generator=generator)[:, None] + torch.arange(settings.seq_len)]
                       for stream in streams])
    held_out = {name: validation_blocks(encode_documents(tokenizer, domain.validation), settings.seq_len,
                                        settings.eval_blocks) for name, domain in domains.items()}
    all_held_out = torch.cat(list(held_out.values()))
    rows = []
    for label, fields in SETTINGS.items():
        start = time.perf_counter()
        recipe = {"method": "traditional", "num_experts_per_tok": 2, "router_init": "random", **fields,
                  "experts": [{"name": name, "source": str(paths[name])} for name in DOMAIN_NAMES]}
        folder = compose(recipe, output=workdir / "compositions" / label.replace(" ", "_").replace(",", ""),
                         overwrite=True, progress=False)
        model = load_model(folder)
        train_routers(model, train, workdir / "runs", max_steps=settings.router_steps,
                      learning_rate=settings.router_lr, batch_size=settings.batch_size, seed=settings.seed,
                      progress=False)
        model.eval()
        share = loads(model, all_held_out)
        dead = int((share < dead_threshold(model.config.num_experts)).sum())
        ppl = perplexity(model, held_out)["mixed"]
        bias = max(router.expert_bias.abs().max().item() for _, router in model.routers())
        rows.append((label, share.max().item(), share.min().item(), dead, ppl, bias, time.perf_counter() - start))
    print(f"traditional, top-2 of {len(DOMAIN_NAMES)} experts, {settings.router_steps} router steps, "
          f"batch {settings.batch_size}, lr {settings.router_lr}, seed {settings.seed}; loads over "
          f"{all_held_out.numel()} held-out tokens x {model.config.num_hidden_layers} routers (uniform share 1/3)")
    print("| setting | max load | min load | dead experts | held-out perplexity | max abs bias | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, high, low, dead, ppl, bias, seconds in rows:
        print(f"| {label} | {high:.3f} | {low:.3f} | {dead} | {ppl:.2f} | {bias:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
