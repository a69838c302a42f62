"""Families that keep a cache of their own (xLSTM's `xLSTMCache`) generate from a composition as from the dense model:
`generate` decides whether a `DynamicCache` fits by the model class's name, so the composed model asks the dense one."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from family_sweep import build_models
from moekit import compose


def test_a_btx_composition_of_xlstm_generates_the_dense_models_tokens(tmp_path):
    _, (dense,) = build_models("xlstm", count=1)
    dense.save_pretrained(tmp_path / "dense")
    recipe = {"method": "btx", "experts": [{"name": name, "source": str(tmp_path / "dense")} for name in "ab"],
              "num_experts_per_tok": 2}
    composed = AutoModelForCausalLM.from_pretrained(compose(recipe, tmp_path / "composed", progress=False)).eval()
    assert not composed._supports_default_dynamic_cache()
    tokens = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense.generate(tokens, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        for use_cache in (True, False):
            got = composed.generate(tokens, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                                    use_cache=use_cache)
            assert torch.equal(got, want), use_cache
