"""The Switch/Mixtral balance loss worked out in float64 with plain Python arithmetic, as a reference for tests.

It shares nothing with `moekit.runtime.routed.routing` (no torch softmax, top-k or counting): each token's probabilities
are `exp(x - max) / sum`, its k experts the k largest logits, f_i and P_i counted in loops, so a test comparing the
library with it can catch a bug in any of those steps.
"""

from __future__ import annotations

import math


def balance_loss_float64(logits, top_k: int, token_mask=None) -> float:
    """``E * sum_i f_i * P_i`` over the tokens where `token_mask` is true; `logits` `[..., E]` (a tensor or nested
    lists), `token_mask` of the same leading shape (or None: every token counts)."""
    rows = _rows(logits)
    keep = [True] * len(rows) if token_mask is None else [bool(m) for m in _flat(token_mask)]
    assert len(keep) == len(rows), (len(keep), len(rows))
    rows = [row for row, kept in zip(rows, keep) if kept]
    experts = len(rows[0])
    slots, probability_sum = [0] * experts, [0.0] * experts
    for row in rows:
        ranked = sorted(range(experts), key=lambda i: -row[i])
        if top_k < experts:
            assert row[ranked[top_k - 1]] != row[ranked[top_k]], "a tie at the k-th logit: the choice is ambiguous"
        for i in ranked[:top_k]:
            slots[i] += 1
        largest = max(row)
        exponentials = [math.exp(x - largest) for x in row]
        total = sum(exponentials)
        for i, value in enumerate(exponentials):
            probability_sum[i] += value / total
    tokens = len(rows)
    return experts * sum(slots[i] / (tokens * top_k) * probability_sum[i] / tokens for i in range(experts))


def _rows(logits) -> list[list[float]]:
    values = logits.detach().double().tolist() if hasattr(logits, "detach") else logits
    while isinstance(values[0][0], list):  # [batch, seq, E] -> [batch * seq, E]
        values = [row for block in values for row in block]
    return [[float(x) for x in row] for row in values]


def _flat(mask) -> list:
    values = mask.tolist() if hasattr(mask, "tolist") else mask
    while values and isinstance(values[0], list):
        values = [x for block in values for x in block]
    return values


def router_z_loss(router_logits, token_mask=None):
    """ST-MoE router z-loss of one router: mean over tokens of logsumexp(logits)^2 (keeps logits small), in torch,
    as the model sums it (the library keeps only the sums it is built from, `RouterSums.logsumexp_squared_sum`)."""
    import torch

    logits = router_logits.float().reshape(-1, router_logits.shape[-1])
    if token_mask is not None:
        logits = logits[token_mask.reshape(-1).to(torch.bool)]
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / max(logits.shape[0], 1)
