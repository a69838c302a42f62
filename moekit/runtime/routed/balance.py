"""The balance loss, a pure function of the routers' outputs (as transformers' `load_balancing_loss_func`): each
router's Switch/Mixtral term `E * sum_i f_i * P_i` and the model's auxiliary loss, `alpha` times their sum over the
routers plus the optional z-loss. What training adds (counts over the data-parallel ranks, the weight for
`num_items_in_batch`, a controller of alpha) wraps it from `training`, never inside it."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from .routing import route


class RouterSums(NamedTuple):
    """One router's sums over the tokens this process saw: what the balance and z losses are made of.

    Means are taken only after training has summed the counts over the data-parallel ranks (`auxiliary_loss`'s
    `global_counts`), so that a run on several ranks optimises the balance of the global batch, as one process would.
    """

    probability_sum: torch.Tensor  # [E] sum over tokens of the router probabilities (carries gradient)
    slots: torch.Tensor  # [E] how many routed slots (token x k) chose each expert, float, no gradient
    tokens: torch.Tensor  # scalar float: how many tokens were counted (padding excluded)
    logsumexp_squared_sum: torch.Tensor  # scalar: sum over tokens of logsumexp(logits)^2 (the z-loss numerator)


def routed_tokens(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A router's logits as float32 `[tokens, E]`, only the tokens where `token_mask` is true (padding excluded)."""
    logits = router_logits.float().reshape(-1, router_logits.shape[-1])
    return logits if token_mask is None else logits[token_mask.reshape(-1).to(torch.bool)]


def slot_counts(logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None = None) -> torch.Tensor:
    """How many routed slots (token x k) chose each expert, as float `[E]`, from `[tokens, E]` logits (and the
    selection bias, if any: the choice `route` makes).

    By comparison with every expert index and a sum, not `torch.bincount`: on CUDA bincount reads the largest index
    back to the host to size its output, a synchronisation per router in every training forward."""
    with torch.no_grad():
        chosen = route(logits, top_k, expert_bias)[1].reshape(-1, 1)
        experts = torch.arange(logits.shape[-1], device=chosen.device)
        return (chosen == experts).sum(dim=0).float()


def router_sums(router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None,
                expert_bias: torch.Tensor | None = None) -> RouterSums:
    """The sums of one router's logits over the tokens where `token_mask` is true; the slots are those `route`
    chooses with `expert_bias` (the probabilities stay the unbiased ones)."""
    logits = routed_tokens(router_logits, token_mask)
    # filled on the device: `torch.tensor(n, device=...)` copies from the host and waits for the stream to drain
    tokens = torch.full((), float(logits.shape[0]), device=logits.device)
    return RouterSums(torch.softmax(logits, dim=-1).sum(dim=0), slot_counts(logits, top_k, expert_bias), tokens,
                      torch.logsumexp(logits, dim=-1).pow(2).sum())


def balance_from_sums(
    probability_sum: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor, top_k: int
) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` from sums: `slots` and `tokens` over the batch the balance is wanted for, and
    `probability_sum` over the tokens whose gradient this process owns (the same tokens on one process)."""
    fraction_routed = slots / (tokens.clamp(min=1) * top_k)
    mean_probability = probability_sum / tokens.clamp(min=1)
    return slots.shape[-1] * torch.sum(fraction_routed * mean_probability)


def load_balancing_loss(
    router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral balance term of one router: ``E * sum_i f_i * P_i`` (without alpha).

    ``f_i`` is the fraction of routed slots (token x k) that chose expert i, ``P_i`` the mean router probability of
    expert i, both over the tokens where `token_mask` is true (padding excluded). It is 1 for perfectly uniform
    routing and E when every token goes to one expert with probability 1 (k = 1; E/k for k > 1).
    """
    sums = router_sums(router_logits, top_k, token_mask)
    return balance_from_sums(sums.probability_sum, sums.slots, sums.tokens, top_k)


class AuxiliaryLoss(NamedTuple):
    """The auxiliary loss of one forward, and the slot counts `[routers, E]` it was computed from."""

    loss: torch.Tensor
    slots: torch.Tensor


def auxiliary_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, alpha: float, z_loss_coef: float = 0.0,
    token_masks: Sequence[torch.Tensor | None] | None = None,
    selection_biases: Sequence[torch.Tensor | None] | None = None,
    global_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AuxiliaryLoss:
    """``alpha * sum over routers of E * sum_i f_i P_i`` (+ ``z_loss_coef`` times the routers' z-losses): the
    balance term of every router (`load_balancing_loss`), each over the tokens its mask keeps, with the slots chosen
    as `route` chose them under each router's selection bias.

    `global_counts` maps the gradient-free counts `[routers, E + 1]` (each router's slots per expert, then its token
    count) to those of the batch the balance is wanted for: training sums them over the data-parallel ranks. The
    probabilities stay this process's, so each rank returns its share of the global batch's loss.
    """
    masks = token_masks if token_masks is not None else [None] * len(router_logits)
    biases = selection_biases if selection_biases is not None else [None] * len(router_logits)
    sums = [router_sums(logits, top_k, mask, bias) for logits, mask, bias in zip(router_logits, masks, biases)]
    counts = torch.stack([torch.cat([s.slots, s.tokens.reshape(1)]).to(sums[0].slots.device) for s in sums])
    if global_counts is not None:
        counts = global_counts(counts)
    balance, z_loss = None, None
    for router_sum, row in zip(sums, counts):
        tokens = row[-1].to(router_sum.probability_sum.device)
        term = balance_from_sums(router_sum.probability_sum, row[:-1].to(tokens.device), tokens, top_k)
        balance = term if balance is None else balance + term.to(balance.device)
        if z_loss_coef:
            z = router_sum.logsumexp_squared_sum / tokens.clamp(min=1)
            z_loss = z if z_loss is None else z_loss + z.to(z_loss.device)
    loss = alpha * balance
    if z_loss is not None:
        loss = loss + z_loss_coef * z_loss
    return AuxiliaryLoss(loss, counts[:, :-1])
