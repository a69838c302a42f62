"""Router initialisation from hidden states: `hidden` (mergekit-style prompts) and `data` (domain samples).

For `hidden` (as mergekit does), each router row becomes a unit vector from the mean hidden state at the router's
input over the expert's negative prompts (or zero) towards the mean over its positive prompts. For `data`, each
router is a softmax classifier fitted on the hidden states at its input, labelled by whose domain sample they come
from (a quick multinomial logistic fit, no bias, as a router has none). The hidden states are
taken from the composed model with every expert mixed uniformly (the averaged model for identical experts), so no
router decision shapes what the routers are initialised from.

When to pick which: `random` when you will train the routers anyway and have no domain data; `zeros` for a uniform
start; `hidden` when you can describe each expert with a few prompts; `data` when you have a sample of each expert's
training domain (the best start: routing is right from the first step).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..errors import TrainingError
from ..runtime.assembly.modeling import MixtureKitForCausalLM


@contextmanager
def uniform_routing(model: MixtureKitForCausalLM) -> Iterator[None]:
    """Every token to every expert with equal weight, for as long as the context lasts."""
    saved = [(module, module.top_k) for _, module in model.routed_modules()]
    weights = [(router, router.weight.detach().clone()) for _, router in model.routers()]
    try:
        for module, _ in saved:
            module.top_k = module.num_experts
        for router, _ in weights:
            router.weight.data.zero_()
        yield
    finally:
        for module, top_k in saved:
            module.top_k = top_k
        for router, weight in weights:
            router.weight.data.copy_(weight)


@torch.no_grad()
def router_inputs(
    model: MixtureKitForCausalLM, tokenizer, texts: list[str] | torch.Tensor, max_length: int = 256,
    desc: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per router, the hidden states entering it over the (non-padding) tokens of `texts`: `[tokens, d]` float32.
    `texts` are strings (tokenized with `tokenizer`) or a `[n, length]` tensor of token ids."""
    if len(texts) == 0:
        raise TrainingError("router initialisation got an empty list of texts for one expert")
    captured: dict[str, list[torch.Tensor]] = {}
    current_mask: list[torch.Tensor] = []

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1]).float()
            kept = hidden[current_mask[0].reshape(-1).bool()] if current_mask[0].numel() == hidden.shape[0] else hidden
            captured.setdefault(name, []).append(kept.cpu())
        return hook

    handles = [router.register_forward_pre_hook(capture(name)) for name, router in model.routers()]
    was_training = model.training
    model.eval()
    try:
        with uniform_routing(model):
            for text in tqdm(texts, desc=desc, unit="text", disable=desc is None):
                if isinstance(text, torch.Tensor):
                    batch = {"input_ids": text[None], "attention_mask": torch.ones_like(text[None])}
                else:
                    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                current_mask[:] = [batch["attention_mask"]]
                model(input_ids=batch["input_ids"].to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in captured.items()}


def _fit_softmax_router(features: list[torch.Tensor], steps: int = 200) -> torch.Tensor:
    """Rows `[E, d]` of a bias-free softmax classifier telling apart the experts' hidden states."""
    inputs = torch.cat(features)
    labels = torch.cat([torch.full((f.shape[0],), i) for i, f in enumerate(features)])
    scale = inputs.norm(dim=-1).mean().clamp(min=1e-6)
    weight = torch.zeros(len(features), inputs.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs / scale @ weight.T, labels) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach() / scale


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm().clamp(min=1e-6)


@torch.no_grad()
def initialize_routers(
    model: MixtureKitForCausalLM,
    tokenizer,
    mode: str,
    positive: dict[str, list[str] | torch.Tensor],
    negative: dict[str, list[str] | torch.Tensor] | None = None,
    scale: float = 1.0,
    progress: bool = False,
) -> None:
    """Set every router's rows from hidden states (see the module docstring). `positive` maps each expert name to
    its prompts (`hidden`) or its domain sample (`data`); `negative` (only for `hidden`) to prompts it should not
    get."""
    names = list(model.config.expert_names)
    if mode not in ("hidden", "data"):
        raise TrainingError(f"router initialisation mode must be hidden or data, got '{mode}'")
    missing = [n for n in names if n not in positive or len(positive[n]) == 0]
    if missing:
        raise TrainingError(f"router initialisation needs texts for every expert; none for {missing} (experts: {names})")
    unknown = sorted(set(positive) - set(names))
    if unknown:
        raise TrainingError(f"router initialisation got texts for unknown experts {unknown}; experts are {names}")
    inputs = {n: router_inputs(model, tokenizer, positive[n], desc=f"router init: {n}" if progress else None)
              for n in names}
    if mode == "data":
        for router_name, router in tqdm(model.routers(), desc="fitting routers", unit="router", disable=not progress):
            rows = _fit_softmax_router([inputs[n][router_name] for n in names]) * scale
            router.weight.copy_(rows.to(router.weight.dtype))
        return
    away = {n: router_inputs(model, tokenizer, negative[n]) if negative and n in negative else None for n in names}
    for router_name, router in model.routers():
        rows = []
        for n in names:
            toward = inputs[n][router_name].mean(0)
            other = away[n][router_name].mean(0) if away[n] is not None else torch.zeros_like(toward)
            rows.append(_unit(toward - other) * scale)
        router.weight.copy_(torch.stack(rows).to(router.weight.dtype))

