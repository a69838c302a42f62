"""Lifecycle of experts (DESIGN.md invariant): removing an expert gives exactly the model with that expert's router
logit masked out (top-k over the rest), and opting it out at inference is the same function.

The reference for "masked" is built here, independently of `disable_experts`: a forward hook that sets the expert's
column of every router's logits to -inf (traditional, btx), or that stream's merge-gate bias to -1e30 so its softmax
weight underflows to exactly 0 (bts)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit import compose, export
from moekit.editing import EditError, add_expert, prune_experts, remove_experts
from moekit.errors import MixtureKitError
from moekit.runtime import Router
from tiny_models import ARCHITECTURES, VOCAB, make_model, randomise_stitches, save_model, tiny_config

ROUTED = ["traditional", "btx"]
BTS_FAMILIES = ["llama", "qwen3", "gpt2"]


def _tokens(batch=2, length=9, seed=3):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _recipe(method, folders, k=2):
    experts = [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)]
    if method == "bts":
        return {"method": "bts", "base": {"name": "hub", "source": str(folders[0])}, "experts": experts}
    return {"method": method, "experts": experts, "num_experts_per_tok": k}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    config = tiny_config(request.param)
    return request.param, root, [save_model(make_model(config, s), root / f"dense{s}") for s in range(3)]


def _composed(method, root, folders):
    """A composed checkpoint of three different experts (bts: with random stitches, so streams reach the output)."""
    out = compose(_recipe(method, folders), root / f"composed-{method}", progress=False, overwrite=True)
    if method != "bts":
        return out
    model = AutoModelForCausalLM.from_pretrained(out)
    randomise_stitches(model, seed=1)
    model.save_pretrained(root / f"stitched-{method}")
    return root / f"stitched-{method}"


def _masked_reference(model, expert: int):
    """Hooks that mask `expert` by hand: its router column at -inf, or its merge-gate chunk's bias at -1e30."""
    if model.config.method == "bts":
        hub = model.config.hidden_size
        with torch.no_grad():
            for stitch in model.stitches:
                if stitch.direction == "merge":
                    stitch.gate.bias[(expert + 1) * hub:(expert + 2) * hub] = -1e30
        return []

    def mask(module, args, output):
        output = output.clone()
        output[..., expert] = float("-inf")
        return output
    return [router.register_forward_hook(mask) for _, router in model.routers()]


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _check_remove_equals_mask(method, root, folders, tmp_path):
    composed = _composed(method, root, folders)
    tokens = _tokens()
    reference = AutoModelForCausalLM.from_pretrained(composed).eval()
    full = _logits(reference, tokens)
    handles = _masked_reference(reference, expert=1)
    masked = _logits(reference, tokens)
    for handle in handles:
        handle.remove()
    assert (masked - full).abs().max() > 1e-4, "masking expert e1 changed nothing: the test would be vacuous"

    smaller = remove_experts(composed, "e1", tmp_path / "removed")
    removed = AutoModelForCausalLM.from_pretrained(smaller).eval()
    assert removed.config.expert_names == ["e0", "e2"]
    assert removed.config.edits == [{"operation": "remove", "experts": ["e1"]}]
    torch.testing.assert_close(_logits(removed, tokens), masked, atol=1e-6, rtol=0)

    opted_out = AutoModelForCausalLM.from_pretrained(composed).eval()
    opted_out.disable_experts(["e1"])
    torch.testing.assert_close(_logits(opted_out, tokens), masked, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in opted_out.parameters())


@pytest.mark.parametrize("method", ROUTED)
def test_remove_equals_masked_router_logit(family, method, tmp_path):
    _, root, folders = family
    _check_remove_equals_mask(method, root, folders, tmp_path)


@pytest.mark.parametrize("model_type", BTS_FAMILIES)
def test_bts_remove_equals_stream_left_out_of_stitches(model_type, tmp_path):
    config = tiny_config(model_type)
    folders = [save_model(make_model(config, s), tmp_path / f"dense{s}") for s in range(3)]
    _check_remove_equals_mask("bts", tmp_path, folders, tmp_path)


def test_opt_out_is_saved_generates_and_can_be_undone(tmp_path):
    config = tiny_config("llama")
    folders = [save_model(make_model(config, s), tmp_path / f"dense{s}") for s in range(3)]
    composed = compose(_recipe("traditional", folders), tmp_path / "composed", progress=False)
    model = AutoModelForCausalLM.from_pretrained(composed).eval()
    tokens = _tokens()
    full = _logits(model, tokens)
    model.disable_experts(["e2"])
    masked = _logits(model, tokens)
    model.save_pretrained(tmp_path / "opted-out")
    assert json.loads((tmp_path / "opted-out" / "config.json").read_text())["disabled_experts"] == ["e2"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "opted-out").eval()
    torch.testing.assert_close(_logits(reloaded, tokens), masked, atol=0, rtol=0)
    with torch.no_grad():  # greedy generation never routes a token to the opted-out expert
        chosen = []
        hooks = [r.register_forward_hook(lambda m, a, o: chosen.append(torch.topk(o, 2).indices))
                 for _, r in reloaded.routers()]
        reloaded.generate(tokens[:1], max_new_tokens=4, do_sample=False)
        for h in hooks:
            h.remove()
    assert chosen and all((c != 2).all() for c in chosen)
    reloaded.enable_experts()
    torch.testing.assert_close(_logits(reloaded, tokens), full, atol=0, rtol=0)
    with pytest.raises(MixtureKitError, match="unknown expert"):
        reloaded.disable_experts(["nope"])
    with pytest.raises(MixtureKitError, match="needs at least 2"):
        reloaded.disable_experts(["e0", "e1"])
    assert reloaded.config.disabled_experts == []
    with pytest.raises(MixtureKitError, match="opted out"):
        export(tmp_path / "opted-out", to="mixtral", output=tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_bad_removals_are_refused_and_write_nothing(tmp_path):
    config = tiny_config("llama")
    folders = [save_model(make_model(config, s), tmp_path / f"dense{s}") for s in range(3)]
    composed = compose(_recipe("traditional", folders), tmp_path / "composed", progress=False)
    with pytest.raises(EditError, match="no expert named 'e9'.*e0, e1, e2"):
        remove_experts(composed, "e9", tmp_path / "out")
    with pytest.raises(EditError, match="leave 1 of 3 experts.*top-2"):
        remove_experts(composed, ["e0", "e1"], tmp_path / "out")
    with pytest.raises(EditError, match="not a composed one"):
        remove_experts(folders[0], "e0", tmp_path / "out")
    with pytest.raises(MixtureKitError, match="already exists"):
        remove_experts(composed, "e0", folders[1])
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".moekit-partial-*"))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi"])
@pytest.mark.parametrize("method", ROUTED)
def test_added_copy_of_the_base_keeps_the_dense_model_and_remove_undoes_add(model_type, method, tmp_path):
    config = tiny_config(model_type)
    dense = make_model(config, 0)
    folders = [save_model(dense, tmp_path / "dense0"), save_model(make_model(config, 1), tmp_path / "dense1")]
    tokens = _tokens()
    copies = compose(_recipe(method, [folders[0]] * 2), tmp_path / "copies", progress=False)
    grown = add_expert(copies, "third", folders[0], tmp_path / "grown")
    model = AutoModelForCausalLM.from_pretrained(grown).eval()
    assert model.config.expert_names == ["e0", "e1", "third"]
    with torch.no_grad():  # random rows for the old experts, zero for the new: any routing gives the dense model
        torch.testing.assert_close(_logits(model, tokens), _logits(dense.eval(), tokens), atol=1e-5, rtol=0)

    mixed = compose(_recipe(method, folders), tmp_path / "mixed", progress=False)
    original = _logits(AutoModelForCausalLM.from_pretrained(mixed).eval(), tokens)
    added = add_expert(mixed, "new", folders[1], tmp_path / "added")
    back = remove_experts(added, "new", tmp_path / "back")
    restored = AutoModelForCausalLM.from_pretrained(back).eval()
    torch.testing.assert_close(_logits(restored, tokens), original, atol=0, rtol=0)
    assert [e["operation"] for e in restored.config.edits] == ["add", "remove"]
    assert "## Edits" in (back / "README.md").read_text()


def test_adding_another_base_or_a_known_name_is_refused(tmp_path):
    folders = [save_model(make_model(tiny_config("llama"), s), tmp_path / f"dense{s}") for s in range(2)]
    composed = compose(_recipe("traditional", folders), tmp_path / "composed", progress=False)
    other = save_model(make_model(tiny_config("qwen2"), 0), tmp_path / "qwen2")
    wider = save_model(make_model(tiny_config("llama", intermediate_size=64), 0), tmp_path / "wider")
    with pytest.raises(EditError, match="qwen2 model, but this composition's base is llama"):
        add_expert(composed, "x", other, tmp_path / "out")
    with pytest.raises(EditError, match="intermediate_size 64"):
        add_expert(composed, "x", wider, tmp_path / "out")
    with pytest.raises(EditError, match="already in this checkpoint"):
        add_expert(composed, "e0", folders[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _save_word_tokenizer(folder):
    """A word-level tokenizer over the tiny vocabulary (`t0` ... `t95`), so the CLI can read text data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0").save_pretrained(folder)


def test_prune_drops_the_unused_expert_and_its_export_loads(tmp_path):
    """An opted-out expert is routed no slot, so pruning one expert must drop it: the pruned checkpoint is the
    opted-out model exactly, and its Mixtral export gives its logits."""
    config = tiny_config("llama")
    folders = [save_model(make_model(config, s), tmp_path / f"dense{s}") for s in range(4)]
    _save_word_tokenizer(folders[0])
    composed = compose(_recipe("traditional", folders), tmp_path / "composed", progress=False)
    model = AutoModelForCausalLM.from_pretrained(composed)
    model.disable_experts(["e2"])
    model.save_pretrained(tmp_path / "opted-out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "opted-out" / name).write_bytes((composed / name).read_bytes())
    data = tmp_path / "data.txt"
    data.write_text("\n".join(" ".join(f"t{(7 * j + i) % VOCAB}" for i in range(12)) for j in range(6)))
    tokens = _tokens()
    opted_out = _logits(model.eval(), tokens)

    path, usage = prune_experts(tmp_path / "opted-out", 1, data, tmp_path / "pruned")
    assert usage["e2"] == 0 and all(usage[n] > 0 for n in ("e0", "e1", "e3"))
    assert abs(sum(usage.values()) - 1) < 1e-9
    pruned = AutoModelForCausalLM.from_pretrained(path).eval()
    assert pruned.config.expert_names == ["e0", "e1", "e3"] and pruned.config.disabled_experts == []
    assert pruned.config.edits[-1]["operation"] == "prune"
    torch.testing.assert_close(_logits(pruned, tokens), opted_out, atol=1e-6, rtol=0)
    exported = export(path, to="mixtral", output=tmp_path / "mixtral")
    native = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert native.config.num_local_experts == 3
    torch.testing.assert_close(_logits(native, tokens), opted_out, atol=1e-5, rtol=0)

    from typer.testing import CliRunner
    from moekit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["edit", str(tmp_path / "opted-out"), "--prune", "1", "--data", str(data),
                                 "-o", str(tmp_path / "pruned-cli")])
    assert result.exit_code == 0, result.output
    assert re.search(r"routed-slot share: .*e2 0\b", result.output), result.output
    assert "experts (3, top-2): e0, e1, e3" in result.output
    assert "prune: e2" in result.output
    result = runner.invoke(app, ["edit", str(path), "--add", f"back={folders[2]}", "-o", str(tmp_path / "added")])
    assert result.exit_code == 0, result.output
    assert "back (added from" in result.output and "e0 (composed)" in result.output
    from transformers import AutoTokenizer
    from moekit.analysis.capture import capture_routing_of_ids
    from moekit.views.html_report import render_report

    for folder, shown in ((tmp_path / "added", ["e2 pruned", "back added"]), (tmp_path / "opted-out", ["e2 opted out"])):
        edited = AutoModelForCausalLM.from_pretrained(folder).eval()
        trace = capture_routing_of_ids(edited, AutoTokenizer.from_pretrained(folder), tokens)
        assert trace.expert_history == shown
        assert "experts edited: " + ", ".join(shown) in render_report(trace)
        if folder.name == "opted-out":  # the opted-out expert has probability 0 and is never chosen
            assert all(row[2] == 0 for row in trace.routes["probs"]) and all(2 not in e for e in trace.routes["experts"])
    result = runner.invoke(app, ["edit", str(path), "--remove", "e0", "--remove", "e1", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "leave 1 of 3 experts" in result.output
    result = runner.invoke(app, ["edit", str(tmp_path / "added"), "-o", str(tmp_path / "refit")]
                           + [f"--router-data={n}={data}" for n in ("e0", "e1", "e3", "back")])
    assert result.exit_code == 0, result.output
    refit = AutoModelForCausalLM.from_pretrained(tmp_path / "refit")
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "added")
    for (name, router), (_, old) in zip(refit.routers(), before.routers()):
        assert not torch.equal(router.weight, old.weight), name  # every router refitted, the rest kept
    assert all(torch.equal(p, before.state_dict()[n]) for n, p in refit.state_dict().items() if "gate" not in n)
    assert "fit_routers: e0, e1, e3, back" in result.output
    result = runner.invoke(app, ["edit", str(path), "--router-data", f"e0={data}", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "missing ['e1', 'e3']" in result.output
    result = runner.invoke(app, ["edit", str(path), "--prune", "1", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--prune needs --data" in result.output
    assert not (tmp_path / "x").exists()


def test_compose_with_data_router_sends_each_domain_to_its_expert(tmp_path):
    """`router_init: data` in the recipe: compose fits the routers from a text file per expert, no training; on
    held-out toy-domain text each domain's (token, router) pairs go mostly to its own expert (random routers: about
    half)."""
    from moekit import load_recipe
    from moekit.editing.router_fit import fit_routers_from_data
    from toy_domains import domain_blocks, dominant_share, make_experts

    folders = make_experts(tmp_path)
    for folder in folders.values():
        _save_word_tokenizer(folder)
    files = {}
    for index, domain in enumerate(("a", "b")):
        files[domain] = tmp_path / f"{domain}.txt"
        files[domain].write_text("\n".join(" ".join(f"t{t}" for t in row.tolist())
                                           for row in domain_blocks(domain, 48, 16, seed=30 + index)))
    recipe = {"method": "traditional", "num_experts_per_tok": 1,
              "experts": [{"name": d, "source": str(folders[d])} for d in ("a", "b")]}
    held_out = {"a": domain_blocks("a", 32, 16, 20), "b": domain_blocks("b", 32, 16, 21)}

    def shares(folder):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return [dominant_share(model, held_out[d], i) for i, d in enumerate(("a", "b"))]

    random = shares(compose(recipe, tmp_path / "random", progress=False))
    fitted_recipe = {**recipe, "router_init": "data", "router_data": {d: str(f) for d, f in files.items()}}
    fitted = compose(fitted_recipe, tmp_path / "fitted", progress=False)
    fitted_shares = shares(fitted)
    assert all(share >= 0.8 for share in fitted_shares), (fitted_shares, random)
    assert sum(random) / 2 < 0.75, random  # random routers: about chance, so the fit is what routes by domain
    config = json.loads((fitted / "config.json").read_text())
    assert config["edits"] == [] and "fitted without training" in (fitted / "README.md").read_text()
    assert not list(tmp_path.glob(".moekit-partial-*"))
    # the same fit on a checkpoint already composed: recorded as an edit, and the same routers
    refit = fit_routers_from_data(tmp_path / "random", files, tmp_path / "refit")
    assert json.loads((refit / "config.json").read_text())["edits"][0]["operation"] == "fit_routers"
    assert shares(refit) == fitted_shares

    with pytest.raises(MixtureKitError, match="router_data with a file for every expert"):
        load_recipe({**recipe, "router_init": "data", "router_data": {"a": str(files["a"])}})
    with pytest.raises(MixtureKitError, match="router_data is read only with router_init: data"):
        load_recipe({**recipe, "router_data": {d: str(f) for d, f in files.items()}})
    with pytest.raises(MixtureKitError, match="router_data files not found"):
        compose({**fitted_recipe, "router_data": {"a": str(files["a"]), "b": str(tmp_path / "none.txt")}},
                tmp_path / "nothing", progress=False)
    assert not (tmp_path / "nothing").exists()


def test_reap_saliency_matches_the_dense_experts_own_ffns(tmp_path):
    """REAP's saliency, recomputed by hand: each block's input captured, routed in float64 from the router weights,
    each chosen expert's output taken from its own dense model's FFN; pruning by it drops the lowest."""
    from moekit.editing import expert_saliency

    config = tiny_config("llama")
    models = [make_model(config, s) for s in range(3)]
    folders = [save_model(m, tmp_path / f"dense{s}") for s, m in enumerate(models)]
    composed = compose(_recipe("traditional", folders), tmp_path / "composed", progress=False)
    model = AutoModelForCausalLM.from_pretrained(composed).eval()
    tokens = _tokens(batch=3, length=10)
    inputs = {}
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, []).append(a[0]))
               for name, module in model.routed_modules()]
    with torch.no_grad():
        for row in tokens:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    expected = torch.zeros(3, dtype=torch.float64)
    for name, module in model.routed_modules():
        layer = int(name.split(".")[2])
        x = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs[name]])
        probabilities = torch.softmax(x.double() @ module.gate.weight.double().T, dim=-1)
        top, chosen = probabilities.topk(2, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        with torch.no_grad():
            outputs = torch.stack([m.model.layers[layer].mlp(x).double() for m in models], dim=1)  # [N, E, d]
        sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for slot in range(2):
            norms = outputs[torch.arange(x.shape[0]), chosen[:, slot]].norm(dim=-1)
            sums.index_add_(0, chosen[:, slot], weights[:, slot] * norms)
            counts.index_add_(0, chosen[:, slot], torch.ones(x.shape[0], dtype=torch.float64))
        expected += sums / counts.clamp(min=1)
    expected /= len(model.routed_modules())
    saliency = expert_saliency(model, tokens)
    torch.testing.assert_close(torch.tensor(list(saliency.values()), dtype=torch.float64), expected, rtol=1e-4, atol=0)
    lowest = min(saliency, key=saliency.get)
    path, scores = prune_experts(composed, 1, tokens, tmp_path / "pruned", by="reap")
    pruned = json.loads((path / "config.json").read_text())
    assert lowest not in pruned["expert_names"] and pruned["edits"][0]["by"] == "REAP saliency"
    with pytest.raises(EditError, match="prune by must be one of usage, reap"):
        prune_experts(composed, 1, tokens, tmp_path / "x", by="size")
    with pytest.raises(EditError, match="prune at most 1"):
        prune_experts(composed, 2, tokens, tmp_path / "x")
    assert not (tmp_path / "x").exists()
