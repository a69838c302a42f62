"""BTS across model families: a hub of one family with expert streams of others (other widths and depths too),
sharing one tokenizer. Each invariant is checked against a reference computed by the dense models themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import CompatibilityError, compose
from tiny_models import VOCAB, make_model, padded_prompts, randomise_stitches, save_model, stitch_gradients, tiny_config

# (hub family, expert family): each expert is wider (48 vs 32) and deeper (3 vs 2 blocks) than its hub.
PAIRS = [("llama", "qwen3"), ("llama", "gemma3_text"), ("llama", "mistral"), ("gemma3_text", "llama"),
         ("qwen3", "olmo2"), ("mistral", "phi3")]
EXPERT_SHAPE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3)


def _write_tokenizer(folder: Path, vocabulary: dict[str, int]) -> None:
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocabulary}, "added_tokens": []}))


SHARED_VOCABULARY = {f"t{i}": i for i in range(VOCAB)}


def _model_folder(root: Path, name: str, family: str, seed: int, vocabulary=SHARED_VOCABULARY, **shape):
    model = make_model(tiny_config(family, **shape), seed)
    folder = save_model(model, root / name)
    if vocabulary is not None:
        _write_tokenizer(folder, vocabulary)
    return model, folder


def _recipe(hub: Path, experts: dict[str, Path], **extra) -> dict:
    return {"method": "bts", "base": {"name": "hub", "source": str(hub)},
            "experts": [{"name": n, "source": str(f)} for n, f in experts.items()], **extra}


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{h}-hub-{e}-expert" for h, e in PAIRS])
def pair(request, tmp_path_factory):
    hub_family, expert_family = request.param
    root = tmp_path_factory.mktemp(f"bts-{hub_family}-{expert_family}")
    hub, hub_folder = _model_folder(root, "hub", hub_family, 0)
    expert, expert_folder = _model_folder(root, "expert", expert_family, 1, **EXPERT_SHAPE)
    return root, hub, hub_folder, expert, expert_folder


def _load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_the_composition_keeps_each_familys_config(pair):
    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}), root / "configs", progress=False, overwrite=True)
    model = _load(out)
    assert model.config.text_config.model_type == hub.config.model_type
    (stream_config,) = model.config.expert_config_objects()
    assert type(stream_config) is type(expert.config)
    assert (stream_config.hidden_size, stream_config.num_hidden_layers) == (48, 3)
    assert type(model.streams["e"]) is type(expert.base_model)


def test_initial_model_gives_exactly_the_hubs_logits(pair):
    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}, stitch_freq=1), root / "init", progress=False,
                  overwrite=True)
    model = _load(out)
    tokens, mask = padded_prompts(3, 20, seed=2)  # longer than the sliding windows (8), left-padded
    with torch.no_grad():
        reference = hub(input_ids=tokens, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=tokens, attention_mask=mask).logits, reference, atol=1e-5, rtol=0)
        randomise_stitches(model, seed=0)  # the expert stream does reach the output once stitches train
        assert (model(input_ids=tokens, attention_mask=mask).logits - reference).abs().max() > 1e-2


def _input_of(module: torch.nn.Module, run) -> torch.Tensor:
    captured = []
    handle = module.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return captured[-1]


def test_a_merge_into_the_expert_gives_the_hubs_head_over_the_expert_familys_own_computation(pair):
    """The last stitch merges fully into the expert (gates forced): the output must be the hub's final norm and head
    over P(h), h the hidden state the expert's own dense model gives its final norm. So the stream ran the expert
    family's code exactly: its embedding (Gemma's scaling), rotary, sliding windows, norms and masks."""
    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}, stitch_layers_index=[1]), root / "merge",
                  progress=False, overwrite=True)
    model = _load(out)
    (stitch,) = model.stitches
    with torch.no_grad():
        stitch.scale.fill_(1.0)
        stitch.gate.weight.zero_()
        stitch.gate.bias.view(2, -1)[0], stitch.gate.bias.view(2, -1)[1] = -100.0, 100.0  # [hub, expert]
    tokens, mask = padded_prompts(2, 20, seed=5)
    with torch.no_grad():
        expert_hidden = _input_of(expert.base_model.norm, lambda: expert(input_ids=tokens, attention_mask=mask))
        projected = stitch.projections[0](expert_hidden)
        handle = hub.base_model.norm.register_forward_pre_hook(lambda _, args: (projected,))
        try:
            reference = hub(input_ids=tokens, attention_mask=mask).logits
        finally:
            handle.remove()
        composed = model(input_ids=tokens, attention_mask=mask).logits
    kept = mask.bool()
    torch.testing.assert_close(composed[kept], reference[kept], atol=1e-5, rtol=0)
    assert (composed[kept] - hub(input_ids=tokens, attention_mask=mask).logits[kept]).abs().max() > 1e-2


def test_padded_generation_with_cache_equals_without(pair):
    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}, stitch_layers_index=[0, 1]), root / "gen",
                  progress=False, overwrite=True)
    model = _load(out)
    randomise_stitches(model, seed=3)
    prompt, mask = padded_prompts(3, 12, seed=4)
    settings = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    assert cached.shape == (3, 22)  # past the sliding windows (8)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings))


def test_save_load_gives_the_same_logits(pair, tmp_path, no_loading_warnings):
    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}), root / "saved", progress=False, overwrite=True)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    randomise_stitches(model, seed=5)
    tokens = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "again")
    reloaded = _load(tmp_path / "again")
    assert type(reloaded.streams["e"]) is type(expert.base_model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, before, atol=0, rtol=0)


def test_stitch_gradients_reach_every_stitch_and_checkpointing_keeps_them(pair):
    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}, stitch_freq=1), root / "grad", progress=False,
                  overwrite=True)
    batch = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    runs = stitch_gradients(out, batch, seed=10)
    for model, _ in runs:
        assert all(p.grad is None for p in model.streams.parameters())  # the expert stays frozen
    gradients = [grads for _, grads in runs]
    assert all(g.abs().sum() > 0 for n, g in gradients[0].items() if "projections" in n)
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-5, rtol=1e-4)


def test_inspect_shows_each_streams_family_width_and_depth(pair):
    from typer.testing import CliRunner

    from moekit.cli import app

    root, hub, hub_folder, expert, expert_folder = pair
    out = compose(_recipe(hub_folder, {"e": expert_folder}), root / "inspect", progress=False, overwrite=True)
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert f"hub: hub ({hub.config.model_type}, hidden 32, 2 blocks)" in result.output
    assert f"e ({expert.config.model_type}, hidden 48, 3 blocks)" in result.output


def test_three_families_at_once(tmp_path):
    """A Llama hub with a Qwen3 stream (wider, deeper) and a Gemma 3 stream (wider, shallower)."""
    hub, hub_folder = _model_folder(tmp_path, "hub", "llama", 0)
    _, qwen = _model_folder(tmp_path, "qwen", "qwen3", 1, **EXPERT_SHAPE)
    _, gemma = _model_folder(tmp_path, "gemma", "gemma3_text", 2, hidden_size=64, num_hidden_layers=1)
    out = compose(_recipe(hub_folder, {"qwen": qwen, "gemma": gemma}, stitch_freq=1), tmp_path / "out",
                  progress=False)
    model = _load(out)
    prompt, mask = padded_prompts(2, 10, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=prompt, attention_mask=mask).logits,
                                   hub(input_ids=prompt, attention_mask=mask).logits, atol=1e-5, rtol=0)
    randomise_stitches(model, seed=8)
    settings = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **settings),
                       model.generate(prompt, use_cache=False, **settings))


def test_different_tokenizers_are_refused_naming_the_first_differing_ids(tmp_path):
    _, hub = _model_folder(tmp_path, "hub", "llama", 0)
    vocabulary = dict(SHARED_VOCABULARY)
    for i in (40, 7, 12):  # three ids hold other tokens; the message lists them by id
        del vocabulary[f"t{i}"]
        vocabulary[f"other{i}"] = i
    _, expert = _model_folder(tmp_path, "expert", "qwen3", 1, vocabulary=vocabulary, **EXPERT_SHAPE)
    with pytest.raises(CompatibilityError) as refused:
        compose(_recipe(hub, {"e": expert}), tmp_path / "out", progress=False)
    message = str(refused.value)
    assert ("models 'hub' and 'e' have different tokenizers (3 of 96 ids differ, the first: "
            "id 7: 't7' in 'hub', 'other7' in 'e'; id 12: 't12' in 'hub', 'other12' in 'e'; "
            "id 40: 't40' in 'hub', 'other40' in 'e')") in message
    assert "may be of other families, widths and depths" in message and "hub 'hub''s tokenizer" in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("hub", "expert")]  # no staging folder left


def test_a_token_missing_from_one_tokenizer_is_named(tmp_path):
    _, hub = _model_folder(tmp_path, "hub", "llama", 0)
    vocabulary = {t: i for t, i in SHARED_VOCABULARY.items() if i != 95}
    _, expert = _model_folder(tmp_path, "expert", "gemma3_text", 1, vocabulary=vocabulary, **EXPERT_SHAPE)
    with pytest.raises(CompatibilityError, match=r"1 of 96 ids differ, the first: id 95: 't95' in 'hub', absent "
                                                 r"in 'e'\)"):
        compose(_recipe(hub, {"e": expert}), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_different_vocabulary_sizes_are_refused(tmp_path):
    _, hub = _model_folder(tmp_path, "hub", "llama", 0)
    _, expert = _model_folder(tmp_path, "expert", "mistral", 1, vocabulary=None, vocab_size=100, **EXPERT_SHAPE)
    with pytest.raises(CompatibilityError) as refused:
        compose(_recipe(hub, {"e": expert}), tmp_path / "out", progress=False)
    message = str(refused.value)
    assert "models 'hub' and 'e' have different vocabulary sizes: 96 vs 100" in message
    assert "must use the hub 'hub''s tokenizer" in message and "embedding size (96 rows)" in message
    assert not (tmp_path / "out").exists()


def test_the_hubs_inputs_embeds_are_refused_for_a_stream_of_another_family(tmp_path):
    _, hub = _model_folder(tmp_path, "hub", "llama", 0)
    _, expert = _model_folder(tmp_path, "expert", "gemma3_text", 1)  # the hub's width: only the family differs
    model = _load(compose(_recipe(hub, {"e": expert}), tmp_path / "out", progress=False))
    embeds = model.get_input_embeddings()(torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match=r"hub's family \(llama\), but expert stream 'e' is a gemma3_text model.*"
                                         r"pass input_ids"):
        model(inputs_embeds=embeds)
