"""bench/anchor_native.py on CPU: its correctness gate passes for a true export and fails for a wrong one, its byte
count is the models' own, and its rows run (the GPU call must not be the first run of any of it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
anchor = pytest.importorskip("anchor_native")

SPEC = dict(anchor.QUICK, layers=1, new_tokens=3, prompt=4, batches=[1, 3], forward_shape=(1, 4))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    built = {"dense": anchor.dense_model(SPEC, cpu, torch.float32).eval(),
             "btx": anchor.composed_model(SPEC, "btx", cpu, torch.float32).eval(),
             "traditional": anchor.composed_model(SPEC, "traditional", cpu, torch.float32).eval()}
    with torch.no_grad():  # routers that really choose (the default init is near-uniform)
        for _, router in built["traditional"].routers():
            router.weight.normal_(0, 1.0)
    built["native"] = anchor.export_native(built["traditional"], tmp_path_factory.mktemp("anchor"), torch.float32, cpu)
    return built


def test_the_gate_passes_the_true_export_and_refuses_a_changed_one(models):
    checked = anchor.gate(models, SPEC, torch.device("cpu"), torch.float32)
    assert type(models["native"]).__name__ == "MixtralForCausalLM"
    assert checked["passed"] and checked["float32_error"] <= 1e-5 and not checked["tensors_different"]
    router = models["native"].model.layers[0].mlp.gate.weight
    saved = router.detach().clone()
    with torch.no_grad():
        router.mul_(-1.0)  # routes to the other experts: same tensors' shapes, a different model
    try:
        failed = anchor.gate(models, SPEC, torch.device("cpu"), torch.float32)
    finally:
        with torch.no_grad():
            router.copy_(saved)
    assert not failed["passed"] and failed["tensors_different"] == ["model.layers.0.mlp.gate.weight"]
    assert failed["float32_error"] > 1e-3


def test_bytes_per_step_count_the_weights_a_step_reads(models):
    """Against the models' own parameters: everything but the embedding table; k of E experts at batch 1."""
    def stored(model, skip=()):
        return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n
                   and not any(s in n for s in skip))

    dense, traditional = models["dense"], models["traditional"]
    assert anchor.parameter_bytes_per_step(SPEC, 1, 4, "dense") == 4 * stored(dense)
    experts = sum(p.numel() for n, p in traditional.named_parameters() if ".experts." in n)
    k, e = SPEC["top_k"], SPEC["experts"]
    assert anchor.parameter_bytes_per_step(SPEC, 1, 4, "traditional") == 4 * (stored(traditional, (".experts.",))
                                                                              + experts * k // e)
    assert anchor.parameter_bytes_per_step(SPEC, 32, 4, "traditional") == 4 * stored(traditional)
    btx = models["btx"]
    routed = sum(p.numel() for n, p in btx.named_parameters() if n.endswith("_proj.weight") and p.dim() == 3)
    assert anchor.parameter_bytes_per_step(SPEC, 1, 4, "btx") == 4 * (stored(btx) - routed + routed * k // e)


def test_every_row_runs_and_gives_ratios_to_the_dense_model(models, monkeypatch):
    monkeypatch.setattr(anchor, "GENERATION_ROUNDS", 1)
    monkeypatch.setattr(anchor, "time_ms", lambda fn, device: (fn(), 1.0)[1])
    cpu = torch.device("cpu")
    rows = [anchor.forward_row(models, SPEC, cpu, backward=True), anchor.forward_row(models, SPEC, cpu, False),
            anchor.generation_row(models, SPEC, cpu, 1), anchor.profile_row(models, SPEC, cpu)]
    json.dumps(rows)  # what --json writes
    assert [r["row"] for r in rows] == ["fwdbwd", "fwd", "gen1", "profile"]
    assert all(rows[0][f"{n}_ratio"] == 1.0 for n in anchor.MODELS)
    assert rows[2]["dense_ratio"] == 1.0 and rows[2]["native_tokens_per_s"] > 0
    assert rows[2]["traditional_gb_per_s"] > 0
    # a decoded token runs more operators in a composed model than in the dense one (each router at least adds some)
    assert rows[3]["traditional_aten_ops_per_token"] > rows[3]["dense_aten_ops_per_token"] > 0
    assert all(p.grad is None for m in models.values() for p in m.parameters())
