"""Freeze policies train exactly what they name: other weights stay bit-identical after optimizer steps."""

from __future__ import annotations

import pytest
import torch

from moekit import MixtureKitConfig, MixtureKitForCausalLM, TrainingError
from moekit.training.freeze import apply_freeze_policy, parameter_roles
from tiny_models import VOCAB, tiny_config


def _model(method):
    extra = {"expert_configs": [tiny_config("llama")], "stitch_layers_index": [1]} if method == "bts" else {}
    config = MixtureKitConfig(text_config=tiny_config("llama"), method=method, expert_names=["a", "b"],
                              num_experts_per_tok=1, **extra)
    return MixtureKitForCausalLM(config)


def _steps(model, count=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(3, VOCAB, (2, 10))
    model.train()
    for _ in range(count):
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method,policy,trained_roles", [
    ("traditional", "routers", {"router"}),
    ("btx", "routers", {"router"}),
    ("traditional", "routers+attention", {"router", "shared"}),
    ("btx", "routers+attention", {"router", "shared"}),
    ("bts", "stitches", {"stitch"}),
    ("btx", "full", {"router", "shared", "stack"}),
])
def test_policy_changes_only_its_parameters(method, policy, trained_roles):
    model = _model(method)
    summary = apply_freeze_policy(model, policy)
    roles = parameter_roles(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert {roles[n] for n in changed} <= trained_roles
    assert all(roles[n] in trained_roles for n in changed)
    unchanged_roles = {roles[n] for n in roles if n not in changed}
    assert not (trained_roles - {"stack", "shared"}) & unchanged_roles or policy == "full"
    assert 0 < summary.trainable < summary.total or policy == "full"
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_policies_that_cannot_apply_are_refused():
    with pytest.raises(TrainingError, match="has none"):
        apply_freeze_policy(_model("bts"), "routers")
    with pytest.raises(TrainingError, match="needs a bts model"):
        apply_freeze_policy(_model("btx"), "stitches")
    with pytest.raises(TrainingError, match="unknown freeze policy 'routerz'"):
        apply_freeze_policy(_model("btx"), "routerz")


def test_the_summary_says_what_trains_by_role(capsys):
    model = _model("btx")
    summary = apply_freeze_policy(model, "routers")
    roles = {role: (count, trains) for role, count, trains in summary.by_role}
    routers = sum(router.weight.numel() for _, router in model.routers())
    assert roles["router"] == (routers, True) and summary.trainable == routers
    assert roles["stack"][1] is False and roles["shared"][1] is False
    assert sum(count for count, _ in roles.values()) == summary.total == sum(p.numel() for p in model.parameters())
    assert f"router {routers:,} trains" in str(summary) and "stack" in str(summary)
