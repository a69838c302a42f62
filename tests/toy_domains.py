"""A toy two-domain task with tiny experts that really specialise: each domain is a counting pattern over its own
token range, and each expert is the shared seed trained on one domain only."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import VOCAB, save_model, tiny_config

DOMAINS = {"a": (3, 49, 1), "b": (50, VOCAB, 2)}  # token range [low, high) and step of the counting pattern
# Wide enough that the 93 tokens' hidden states can be told apart by a linear router (with 32 dimensions they
# cannot: more points than a linear classifier separates).
TOY_SHAPE = dict(hidden_size=128, intermediate_size=256)


def domain_blocks(domain: str, count: int, length: int, seed: int) -> torch.Tensor:
    low, high, step = DOMAINS[domain]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(low, high, (count, 1), generator=generator)
    offsets = torch.arange(length) * step
    return low + (starts - low + offsets) % (high - low)


def train_dense(model, blocks: torch.Tensor, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def make_experts(root: Path, steps: int = 150) -> dict[str, Path]:
    """Seed (untrained) plus one expert per domain branched from it; returns their folders."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    seed = AutoModelForCausalLM.from_config(tiny_config("llama", **TOY_SHAPE))
    folders = {"seed": save_model(seed, root / "seed")}
    for index, domain in enumerate(DOMAINS):
        expert = AutoModelForCausalLM.from_config(tiny_config("llama", **TOY_SHAPE))
        expert.load_state_dict(seed.state_dict())
        train_dense(expert, domain_blocks(domain, 256, 16, seed=index), steps, seed=index)
        folders[domain] = save_model(expert, root / domain)
    return folders


def dominant_share(model, blocks: torch.Tensor, expert: int) -> float:
    """Share of (token, router) pairs whose top choice is `expert`."""
    with torch.no_grad():
        logits = model(input_ids=blocks, output_router_logits=True).router_logits
    return torch.cat([l.argmax(-1) == expert for l in logits]).float().mean().item()
