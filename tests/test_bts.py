"""BTS: hub + frozen expert streams + stitches. Identity at initialisation, per-stream KV caches, other sizes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import CompatibilityError, RecipeError, compose, load_recipe
from tiny_models import (
    VOCAB, make_model, padded_prompts, randomise_stitches, save_model, stitch_gradients, tiny_config,
)

FAMILIES = ["llama", "qwen3", "gemma3_text", "mistral", "qwen2", "phi3", "olmo2"]


@pytest.fixture(scope="module", params=FAMILIES)
def trio(request, tmp_path_factory):
    """A hub and two experts of one family: one of the hub's shape, one wider and deeper."""
    root = tmp_path_factory.mktemp(f"bts-{request.param}")
    hub = make_model(tiny_config(request.param), 0)
    same = make_model(tiny_config(request.param), 1)
    other = make_model(tiny_config(request.param, hidden_size=48, num_hidden_layers=3), 2)
    folders = [save_model(m, root / n) for m, n in ((hub, "hub"), (same, "same"), (other, "other"))]
    return request.param, root, hub, folders


def _recipe(folders, **extra):
    hub, *experts = folders
    return {"method": "bts", "base": {"name": "hub", "source": str(hub)},
            "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(experts)], **extra}


def _tokens(batch=2, length=9, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("experts", ["same", "mixed"])
def test_initial_stitches_give_exactly_the_hubs_logits(trio, experts):
    family, root, hub, folders = trio
    chosen = folders[:2] if experts == "same" else folders
    out = compose(_recipe(chosen, stitch_freq=1), root / f"init-{experts}", progress=False, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, hub(input_ids=tokens).logits, atol=1e-5, rtol=0)
        randomise_stitches(model)  # and the stitches do act once trained
        assert (model(input_ids=tokens).logits - hub(input_ids=tokens).logits).abs().max() > 1e-2


def test_generation_with_per_stream_caches_equals_without_cache(trio):
    family, root, hub, folders = trio
    out = compose(_recipe(folders, stitch_layers_index=[0, 1]), root / "gen", progress=False, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    randomise_stitches(model, seed=3)
    prompt = _tokens(batch=1, length=5, seed=4)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings))
    assert cached.shape[1] == 15


@pytest.mark.parametrize(("batch", "length"), [(2, 7), (3, 12)])
def test_padded_batch_generation_with_cache_equals_without(trio, batch, length):
    family, root, hub, folders = trio
    out = compose(_recipe(folders, stitch_layers_index=[0, 1]), root / "gen", progress=False, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    randomise_stitches(model, seed=3)
    prompt, mask = padded_prompts(batch, length, seed=length)
    settings = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    assert cached.shape == (batch, length + 8)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings))


def test_save_load_restores_stitches_and_logits(trio, tmp_path, no_loading_warnings):
    family, root, hub, folders = trio
    out = compose(_recipe(folders), root / "saved", progress=False, overwrite=True)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    randomise_stitches(model, seed=5)
    model.eval()
    tokens = _tokens()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    for (name, a), (_, b) in zip(model.stitches.named_parameters(), reloaded.stitches.named_parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, before, atol=0, rtol=0)


def test_composed_twice_gives_identical_bytes(trio):
    family, root, hub, folders = trio
    digests = []
    for attempt in ("a", "b"):
        out = compose(_recipe(folders, stitch_freq=1), root / f"twice-{attempt}", progress=False, overwrite=True)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.safetensors")})
    assert digests[0] == digests[1] != {}


def test_only_stitches_train_and_a_few_steps_lower_the_loss(trio):
    family, root, hub, folders = trio
    out = compose(_recipe(folders, stitch_freq=1), root / "train", progress=False, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("stitches.") for name in trainable)
    assert trainable == {f"stitches.{n}" for n, _ in model.stitches.named_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = _tokens(batch=4, length=12, seed=7)
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen_before[name]), name


def test_gradient_checkpointing_gives_the_same_stitch_gradients(trio):
    family, root, hub, folders = trio
    out = compose(_recipe(folders, stitch_freq=1), root / "ckpt", progress=False, overwrite=True)
    batch = _tokens(batch=2, length=8, seed=8)
    gradients = [grads for _, grads in stitch_gradients(out, batch, seed=9)]
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-5, rtol=1e-4)


def test_inputs_embeds(trio):
    family, root, hub, folders = trio
    out = compose(_recipe(folders[:2]), root / "embeds", progress=False, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    embeds = model.get_input_embeddings()(tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, hub(inputs_embeds=embeds).logits,
                                   atol=1e-5, rtol=0)
        randomise_stitches(model)
        assert model(inputs_embeds=embeds).logits.isfinite().all()
    generated = model.generate(inputs_embeds=embeds[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape[-1] == 4
    mixed = AutoModelForCausalLM.from_pretrained(compose(_recipe(folders), root / "embeds-mixed", progress=False,
                                                         overwrite=True))
    with pytest.raises(ValueError, match="pass input_ids"):
        mixed(inputs_embeds=embeds)


def test_inspect_shows_stitches_and_cost(trio):
    from moekit import build_plan, plan_summary

    family, root, hub, folders = trio
    text = plan_summary(build_plan(_recipe(folders, stitch_layers_index=[1])))
    assert "stitches after hub blocks: 1 (merge)" in text
    assert "e1 (" in text and "hidden 48, 3 blocks" in text and "its blocks done at each stitch: [3]" in text
    assert "trainable" in text


def test_bad_bts_inputs(trio, tmp_path):
    family, root, hub, folders = trio
    with pytest.raises(RecipeError, match=r"stitch_layers_index \[7\] out of range.*0\.\.1"):
        compose(_recipe(folders, stitch_layers_index=[0, 7]), tmp_path / "o", progress=False)
    with pytest.raises(RecipeError, match="stitch_freq must be at least 1"):
        load_recipe(_recipe(folders, stitch_freq=0))
    other_vocab = save_model(make_model(tiny_config(family, vocab_size=100), 3), tmp_path / "vocab")
    with pytest.raises(CompatibilityError, match="vocabulary sizes"):
        compose(_recipe([folders[0], other_vocab]), tmp_path / "o", progress=False)
    with pytest.raises(RecipeError, match="hub and at least one expert"):
        load_recipe({"method": "bts", "experts": [{"name": "a", "source": str(folders[0])}]})
    assert not (tmp_path / "o").exists()


class _IndexPassingBlock(torch.nn.Module):
    """A block that, like GLM-5's and HY-V4's, returns its top-k indices beside the hidden state for the next one."""

    def forward(self, hidden, previous_indices=None):
        return hidden + 1, hidden.argmax(-1)


class _IndexPassingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_IndexPassingBlock(), _IndexPassingBlock()])

    def forward(self, hidden):
        indices = None
        for layer in self.layers:
            hidden, indices = layer(hidden, previous_indices=indices)
        return hidden


def test_a_stream_whose_blocks_hand_on_more_than_the_hidden_state_is_refused_in_words():
    """Such blocks cannot run one at a time from recorded calls (what they hand on depends on the stitched state):
    the refusal names the block and what it returns, not only the forward's own unpacking error."""
    from moekit import UnsupportedArchitectureError
    from moekit.runtime.bts.streams import capture_stream

    model = _IndexPassingModel()
    with pytest.raises(UnsupportedArchitectureError) as raised:
        capture_stream(model, model.layers, {"hidden": torch.zeros(1, 3, 4)})
    assert str(raised.value) == ("bts cannot run _IndexPassingModel as a stream: its blocks (_IndexPassingBlock) return "
                                 "Tensor beside the hidden state, which its forward hands on to the next block, so its "
                                 "blocks cannot be run one at a time between stitches")
    assert all(isinstance(layer, _IndexPassingBlock) for layer in model.layers)  # its blocks are put back


def test_blocks_are_counted_by_the_stored_count_where_num_hidden_layers_is_derived():
    """LongCat-Flash's blocks each hold two attention sublayers, and its config's num_hidden_layers is twice its
    blocks (its model sets it so): its decoder blocks are found by num_layers, which bts stitches between."""
    from family_sweep import tiny_config as sweep_config
    from moekit.runtime.base_model.architecture import decoder_layers, num_layers

    config = sweep_config("longcat_flash")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    name, blocks = decoder_layers(model, config)
    assert name == "model.layers" and blocks is model.model.layers
    assert num_layers(config) == len(model.model.layers) == config.num_layers
