"""`generate` on a release that cannot track a recurrent cache's length: one clear refusal, not transformers' error.

transformers 5.17's prefill asks the cache for `get_seq_length()`, which a `DynamicCache` of Mamba layers only cannot
answer (later releases do not ask; the family sweep covers both on their releases). Here the prefill is made to fail
as 5.17's does, on any release, so the translation is checked everywhere."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationMixin

from moekit import UnsupportedArchitectureError, compose
from moekit.runtime.assembly.modeling import MixtureKitForCausalLM
from tiny_models import make_model, save_model, tiny_config

FIVE_SEVENTEEN = ("`get_seq_length` can only be called on Attention layers, and the current Cache seem to only "
                  "contain LinearAttention layers.")


@pytest.fixture(scope="module")
def bts_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_refusal")
    config = tiny_config("llama")
    hub, expert = (save_model(make_model(config, seed), root / name) for seed, name in ((0, "hub"), (1, "e")))
    recipe = {"method": "bts", "base": {"name": "hub", "source": str(hub)},
              "experts": [{"name": "e", "source": str(expert)}], "stitch_freq": 1}
    return MixtureKitForCausalLM.from_pretrained(compose(recipe, output=root / "bts", progress=False))


def test_a_cache_without_a_length_is_refused_in_one_sentence(bts_model, monkeypatch):
    def prefill_as_on_5_17(self, *args, **kwargs):
        raise ValueError(FIVE_SEVENTEEN)

    monkeypatch.setattr(GenerationMixin, "_prefill", prefill_as_on_5_17)
    with pytest.raises(UnsupportedArchitectureError, match="only recurrent cache layers.*transformers 5.24 or later"):
        bts_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


def test_other_errors_of_the_prefill_pass_unchanged(bts_model, monkeypatch):
    def prefill_failing(self, *args, **kwargs):
        raise ValueError("something else")

    monkeypatch.setattr(GenerationMixin, "_prefill", prefill_failing)
    with pytest.raises(ValueError, match="something else"):
        bts_model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
