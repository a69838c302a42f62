"""Perplexity, computed in one place (`moekit.evaluation`) for `evaluate` and the demo."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.evaluation import perplexity
from tiny_models import VOCAB, make_model, tiny_config


def test_perplexity_is_the_exponent_of_the_mean_next_token_loss_per_name_and_over_all():
    model = make_model(tiny_config("llama"), 0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    blocks = {"a": torch.randint(0, VOCAB, (3, 9), generator=generator),
              "b": torch.randint(0, VOCAB, (2, 9), generator=generator)}
    result = perplexity(model, blocks, batch_size=2)  # batches that split "a" unevenly
    assert model.training  # given back as it came
    model.eval()
    with torch.no_grad():  # transformers' own shifted mean cross-entropy, one forward per name
        losses = {name: model(input_ids=ids, labels=ids).loss.item() for name, ids in blocks.items()}
    assert set(result) == {"a", "b", "mixed"}
    for name, loss in losses.items():
        assert result[name] == pytest.approx(math.exp(loss), rel=1e-5)
    mixed = (losses["a"] * 3 * 8 + losses["b"] * 2 * 8) / (5 * 8)
    assert result["mixed"] == pytest.approx(math.exp(mixed), rel=1e-5) and result["a"] != result["b"]
