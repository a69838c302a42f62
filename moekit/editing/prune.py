"""Prune the least used experts of a composed checkpoint, by the routing statistics of the user's data: each
expert's share of the routed slots (token × k), summed over every router, as `moekit report` counts them.

Overall, not per layer: a composed checkpoint holds one expert set for every routed layer (`expert_names`), so an
expert is dropped from every layer at once. The pruned checkpoint is `remove_experts` of those experts (exact:
the old model with them masked)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.config import MixtureKitConfig, require_composed
from ..runtime.routing import route
from .remove import EditError, remove_experts


def read_texts(path: str | Path) -> list[str]:
    """Texts of a data file: one per line of a .txt file, the `text` field of each line of a .jsonl file."""
    import json

    path = Path(path)
    if not path.is_file():
        raise EditError(f"data file '{path}' does not exist; give a .txt (one text per line) or .jsonl (a `text` "
                        "field per line) file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise EditError(f"'{path}' is not JSON lines with a `text` field: {error}") from None
    return lines


@torch.no_grad()
def expert_usage(model, texts: list[str] | torch.Tensor, tokenizer=None, max_length: int = 256) -> dict[str, float]:
    """Each expert's share of the routed slots over `texts` (strings, or a `[n, length]` tensor of token ids),
    summed over every router; the shares sum to 1."""
    config = model.config
    if config.method == "bts":
        raise EditError("a bts composition has no routers to count; remove its streams by name (--remove)")
    if len(texts) == 0:
        raise EditError("pruning needs data: the data file has no texts")
    counts = torch.zeros(config.num_experts, dtype=torch.float64)
    biases = model.routing_biases()
    model.eval()
    for text in texts:
        if isinstance(text, torch.Tensor):
            ids = text[None]
        else:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        output = model(input_ids=ids.to(model.device), output_router_logits=True, use_cache=False)
        for name, logits in zip(model.router_recorder.names, output.router_logits):
            chosen = route(logits, config.num_experts_per_tok, biases.get(name))[1].reshape(-1).cpu()
            counts += torch.bincount(chosen, minlength=config.num_experts).double()
    shares = counts / counts.sum().clamp(min=1)
    return dict(zip(config.expert_names, shares.tolist()))


def least_used(usage: dict[str, float], count: int) -> list[str]:
    """The `count` experts with the smallest shares (ties: the later expert first, so the order is stable)."""
    order = sorted(usage, key=lambda name: (usage[name], -list(usage).index(name)))
    return order[:count]


def prune_experts(checkpoint: str | Path, count: int, data: str | Path | list[str] | torch.Tensor,
                  output: str | Path, overwrite: bool = False, progress: bool = False,
                  device: str | None = None) -> tuple[Path, dict[str, float]]:
    """Drop the `count` least used experts over `data` (a file, texts or token ids); returns the output and the
    usage it decided by. `device`: where the model runs over the data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_composed(checkpoint, "only a composition has experts to prune", EditError)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    if not isinstance(count, int) or count < 1:
        raise EditError(f"the number of experts to prune must be a positive integer, got {count!r}")
    if config.num_experts - count < config.num_experts_per_tok:
        raise EditError(f"pruning {count} of {config.num_experts} experts would leave fewer than the "
                        f"{config.num_experts_per_tok} that top-{config.num_experts_per_tok} routing needs; prune at "
                        f"most {config.num_experts - config.num_experts_per_tok}")
    texts = read_texts(data) if isinstance(data, (str, Path)) else data
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if device is not None:
        model.to(device)
    tokenizer = None if isinstance(texts, torch.Tensor) else AutoTokenizer.from_pretrained(checkpoint)
    usage = expert_usage(model, texts, tokenizer)
    del model
    dropped = least_used(usage, count)
    details = {"by": "routed-slot share", "usage": {n: round(s, 6) for n, s in usage.items()}}
    path = remove_experts(checkpoint, dropped, output, overwrite=overwrite, progress=progress, operation="prune",
                          details=details)
    return path, usage
