"""Routing capture and its reductions, for traditional, btx and bts models with a real tokenizer."""

from __future__ import annotations

import types

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekit import compose
from moekit.analysis import (
    AnalysisError, capture_routing, capture_routing_of_ids, dead_experts, dominant_expert_per_token, gate_strength, layer_agreement,
    mean_token_entropy, routing_by_label, utilisation,
)
from moekit.demo import run_demo

TEXTS = ["def add(a, b):\n    return a + b", "The quick brown fox jumps.", "17 + 25 = 42"]
LABELS = ["code", "prose", "arithmetic"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    run_demo(root, quick=True, progress=False)
    bts = compose({"method": "bts", "base": {"name": "seed", "source": str(root / "seed")},
                   "experts": [{"name": n, "source": str(root / "experts" / n)} for n in LABELS], "stitch_freq": 1},
                  root / "bts", progress=False)
    return root, AutoTokenizer.from_pretrained(root / "btx"), bts


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_capture_shapes_and_probabilities(demo, method):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / f"{method}+routers")
    trace = capture_routing(model, tokenizer, TEXTS, LABELS)
    routers = [name for name, _ in model.routers()]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert len(trace.routes) == tokens * len(routers) and sorted(trace.routers) == sorted(routers)
    for probs, weights, experts in zip(trace.routes["probs"], trace.routes["weights"], trace.routes["experts"]):
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and sum(weights) == pytest.approx(1.0, abs=1e-5)
        assert len(experts) == model.config.num_experts_per_tok and experts[0] == max(range(3), key=probs.__getitem__)
    assert "".join(trace.routes[(trace.routes.text_index == 0) & (trace.routes.router == routers[0])]["token"]) == TEXTS[0]
    shares = utilisation(trace)
    assert list(shares.columns) == LABELS and shares.sum(axis=1).round(6).eq(1.0).all()
    assert mean_token_entropy(trace).between(0, 1).all()
    assert 0 <= layer_agreement(trace) <= 1
    by_label = routing_by_label(trace)
    assert set(by_label.index) == set(LABELS) and by_label.sum(axis=1).round(6).eq(1.0).all()
    assert len(dominant_expert_per_token(trace)) == tokens


def test_capture_of_token_ids_is_the_capture_of_their_text(demo):
    """Evaluation blocks (token ids) are analysed like texts: same table, same reductions (the demo's routing table)."""
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx+routers")
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    by_text = capture_routing(model, tokenizer, TEXTS, LABELS)
    by_ids = capture_routing_of_ids(model, tokenizer, ids, LABELS)
    assert by_ids.texts == TEXTS and by_ids.truncated == [False] * 3 and len(by_ids.routes) == len(by_text.routes)
    pd.testing.assert_frame_equal(by_ids.routes, by_text.routes)
    pd.testing.assert_frame_equal(routing_by_label(by_ids), routing_by_label(by_text))
    short = capture_routing_of_ids(model, tokenizer, torch.tensor([ids[0][:6]]), max_tokens=4)
    assert short.truncated == [True] and short.routes["position"].max() == 3
    with pytest.raises(AnalysisError, match="one label per text"):
        capture_routing_of_ids(model, tokenizer, ids, LABELS[:2])


def test_forced_router_shows_one_hundred_percent(demo):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "traditional+routers")
    forced_name, forced = model.routers()[1]

    def to_arithmetic(self, hidden):
        logits = torch.full((hidden.shape[0], 3), -30.0)
        logits[:, 2] = 30.0
        self.recorder.record(self.qualified_name, logits)
        return logits

    forced.forward = types.MethodType(to_arithmetic, forced)
    trace = capture_routing(model, tokenizer, TEXTS)
    assert utilisation(trace).loc[forced_name, "arithmetic"] == pytest.approx(0.5)  # top-2: one of the two slots
    rows = trace.routes[trace.routes.router == forced_name]
    assert all(e[0] == 2 for e in rows["experts"]) and all(w[0] == pytest.approx(1.0) for w in rows["weights"])
    assert (rows["dominant"] == "arithmetic").all()
    # Certain on every token (mean token entropy 0), though its load is split over two experts (load entropy > 0).
    assert mean_token_entropy(trace)[forced_name] == pytest.approx(0.0, abs=1e-6)
    # The second slot is a tie between code and prose at -30; top-k takes the lower index, so prose never runs.
    assert dead_experts(trace)[forced_name] == ["prose"]


def test_bts_gates(demo):
    root, tokenizer, bts = demo
    model = AutoModelForCausalLM.from_pretrained(bts)
    with torch.no_grad():
        for name, parameter in model.stitches.named_parameters():
            parameter.normal_(0, 0.3)
    trace = capture_routing(model, tokenizer, TEXTS[:2])
    assert trace.routes.empty and not trace.gates.empty
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS[:2])
    per_stitch = {"merge": 4, "broadcast": 3}  # merge gates: hub + 3 experts (softmax); broadcast: one per expert
    expected = sum(per_stitch[s.direction] for s in model.stitches) * tokens
    assert len(trace.gates) == expected
    merges = trace.gates[trace.gates.direction == "merge"]
    summed = merges.groupby(["text_index", "position", "stitch"])["gate_mean"].sum()
    assert summed.round(5).eq(1.0).all()  # softmax over [hub, experts] per dimension: means sum to 1
    assert gate_strength(trace).shape[0] == len(model.stitches)


def test_bad_inputs(demo, tmp_path):
    root, tokenizer, _ = demo
    dense = AutoModelForCausalLM.from_pretrained(root / "seed")
    with pytest.raises(AnalysisError, match="not a composed model"):
        capture_routing(dense, tokenizer, TEXTS)
    model = AutoModelForCausalLM.from_pretrained(root / "btx")
    with pytest.raises(AnalysisError, match="non-empty text"):
        capture_routing(model, tokenizer, ["  "])
    with pytest.raises(AnalysisError, match="one label per text"):
        capture_routing(model, tokenizer, TEXTS, ["code"])
    trace = capture_routing(model, tokenizer, ["word " * 400], max_tokens=32)
    assert trace.truncated == [True] and trace.routes["position"].max() == 31


def test_capture_never_runs_past_the_models_positions(demo):
    root, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx")
    positions = model.config.text_config.max_position_embeddings
    long_text = " ".join(["def add(a, b): return a + b"] * positions)
    trace = capture_routing(model, tokenizer, [long_text], max_tokens=10 * positions)
    assert trace.truncated == [True] and trace.max_tokens == positions
    assert len(trace.routes) == positions * len(model.routers())
