"""Prune the least used experts of a composed checkpoint, by the routing statistics of the user's data: each
expert's share of the routed slots (token × k), summed over every router, as `moekit report` counts them; or by
REAP's router-weighted saliency (routing weight × the norm of the expert's output, over the tokens routed to it).

Overall, not per layer: a composed checkpoint holds one expert set for every routed layer (`expert_names`), so an
expert is dropped from every layer at once. The pruned checkpoint is `remove_experts` of those experts (exact:
the old model with them masked)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.assembly.config import MixtureKitConfig, require_composed
from ..runtime.routed.routing import route
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


def _slot_outputs(module, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each token's chosen experts' own outputs, unweighted, `[N*k, out]` (the shared expert left out)."""
    from ..runtime.compute.experts import chosen_experts_output
    from ..runtime.routed.moe_block import SparseMoeBlock

    if isinstance(module, SparseMoeBlock):
        experts = module.experts
        up = getattr(experts, experts.up_name)
        hidden = chosen_experts_output(tokens, up, getattr(experts, f"{experts.up_name}_bias"), indices)
        return chosen_experts_output(experts.activate(hidden), experts.down_proj, experts.down_proj_bias, indices)
    return chosen_experts_output(tokens, module.weight, module.bias, indices)


@torch.no_grad()
def expert_saliency(model, texts: list[str] | torch.Tensor, tokenizer=None, max_length: int = 256
                    ) -> dict[str, float]:
    """REAP's saliency (arXiv 2510.13999) of each expert: at each routed module, the mean over the tokens routed to
    it of its routing weight times the norm of its own output, g_j(x)·||f_j(x)||; then the mean over the routed
    modules. An expert no token reaches scores 0."""
    from ..runtime.routed.routing import float32_logits

    config = model.config
    if config.method == "bts":
        raise EditError("a bts composition has no routers to score; remove its streams by name (--remove)")
    if len(texts) == 0:
        raise EditError("pruning needs data: the data file has no texts")
    experts = config.num_experts
    modules = model.routed_modules()
    totals = torch.zeros(len(modules), experts, dtype=torch.float64)
    counts = torch.zeros(len(modules), experts, dtype=torch.float64)

    def score(position: int, module):
        router = module.gate if hasattr(module, "gate") else module.router

        def hook(_, args):
            tokens = args[0].reshape(-1, args[0].shape[-1])
            logits = float32_logits(tokens, router.weight)
            if router.disabled_experts:
                logits = logits.masked_fill(router.disabled_mask(logits.device), float("-inf"))
            weights, indices = route(logits, module.top_k, router.selection_bias)
            norms = _slot_outputs(module, tokens, indices).float().norm(dim=-1).reshape(indices.shape)
            flat = indices.reshape(-1).cpu()
            totals[position].index_add_(0, flat, (weights * norms).reshape(-1).double().cpu())
            counts[position].index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        return hook

    handles = [module.register_forward_pre_hook(score(i, module)) for i, (_, module) in enumerate(modules)]
    model.eval()
    try:
        for text in texts:
            ids = text[None] if isinstance(text, torch.Tensor) else tokenizer(
                text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    saliency = (totals / counts.clamp(min=1)).mean(dim=0)
    return dict(zip(config.expert_names, saliency.tolist()))


PRUNE_BY = {"usage": ("routed-slot share", expert_usage), "reap": ("REAP saliency", expert_saliency)}


def least_used(usage: dict[str, float], count: int) -> list[str]:
    """The `count` experts with the smallest shares (ties: the later expert first, so the order is stable)."""
    order = sorted(usage, key=lambda name: (usage[name], -list(usage).index(name)))
    return order[:count]


def prune_experts(checkpoint: str | Path, count: int, data: str | Path | list[str] | torch.Tensor,
                  output: str | Path, overwrite: bool = False, progress: bool = False,
                  device: str | None = None, by: str = "usage") -> tuple[Path, dict[str, float]]:
    """Drop the `count` least used experts over `data` (a file, texts or token ids); returns the output and the
    scores it decided by. `by`: `usage` (each expert's share of the routed slots) or `reap` (REAP's saliency,
    `expert_saliency`). `device`: where the model runs over the data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_composed(checkpoint, "only a composition has experts to prune", EditError)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    if by not in PRUNE_BY:
        raise EditError(f"prune by must be one of {', '.join(PRUNE_BY)}, got {by!r}")
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
    what, measure = PRUNE_BY[by]
    usage = measure(model, texts, tokenizer)
    del model
    dropped = least_used(usage, count)
    details = {"by": what, "scores": {n: round(s, 6) for n, s in usage.items()}}
    path = remove_experts(checkpoint, dropped, output, overwrite=overwrite, progress=progress, operation="prune",
                          details=details)
    return path, usage
