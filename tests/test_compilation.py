"""`compile: true`: every decoder block runs compiled, however deep the model (Dynamo's default limit of 8 graphs
per code object once left every block after the eighth in eager code), and trains what eager code trains."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from moekit import MixtureKitConfig, MixtureKitForCausalLM
from moekit.training import compilation, train_routers

LAYERS = 12


def _btx_model() -> MixtureKitForCausalLM:
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = MixtureKitConfig(text_config=text, method="btx", expert_names=["a", "b", "c"], num_experts_per_tok=2,
                              router_layers=["gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    return MixtureKitForCausalLM(config).to(torch.bfloat16)  # bf16: the GPU's grouped_mm path, no host sync


def test_every_block_of_a_deep_model_trains_compiled_and_like_eager(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compilation, "BACKEND", "aot_eager")  # the same graphs as inductor's, no C++ compiler
    blocks = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    routers = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _btx_model()
        train_routers(model, blocks, tmp_path / f"run-{compiled}", max_steps=3, batch_size=4, learning_rate=0.05,
                      progress=False, compile_blocks=compiled)
        routers[compiled] = {name: p.detach().float().clone() for name, p in model.named_parameters()
                             if name.endswith("router.weight")}
        if compiled:
            # one graph per block (each router's name is its own constant), none given up on, none broken
            assert counters["stats"]["unique_graphs"] == LAYERS, dict(counters["stats"])
            assert counters["frames"]["ok"] == LAYERS and not counters["graph_break"], dict(counters["frames"])
    assert routers[True].keys() == routers[False].keys() and len(routers[True]) == 3 * LAYERS
    for name, weight in routers[False].items():
        torch.testing.assert_close(routers[True][name], weight, atol=2e-2, rtol=2e-2)  # bf16 weights, 3 AdamW steps
