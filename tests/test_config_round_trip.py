"""config.json of a composition rebuilds the very base config (and bts stream configs) it was written from, on every
release we support: the base's config is written as its own save_pretrained writes it."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, DbrxConfig, Gemma3Config, LlamaConfig, Qwen2Config

from moekit.runtime.assembly.config import MixtureKitConfig


def _fields(config) -> dict:
    fields = config.to_dict()
    fields.pop("transformers_version", None)
    return fields


@pytest.mark.parametrize("text_config", [
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    # DBRX's nested attention and FFN configs refuse generic fields on transformers 5.17
    DbrxConfig(d_model=32, n_heads=4, n_layers=2, ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4}),
    Gemma3Config(),  # a multimodal wrapper: text and vision sub-configs
], ids=["llama", "dbrx", "gemma3"])
def test_saved_config_rebuilds_the_base_and_stream_configs(tmp_path, text_config):
    stream = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    written = MixtureKitConfig(text_config=text_config, method="bts", expert_names=["hub", "a"],
                               expert_configs=[text_config, stream], num_experts_per_tok=1)
    written.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MixtureKitConfig)
    assert type(loaded.text_config) is type(text_config)
    assert _fields(loaded.text_config) == _fields(text_config)
    rebuilt = loaded.expert_config_objects()
    assert [type(c) for c in rebuilt] == [type(text_config), Qwen2Config]
    assert _fields(rebuilt[0]) == _fields(text_config) and _fields(rebuilt[1]) == _fields(stream)
