"""Image-text experts composed through their language model, still image-text models (DESIGN.md, "Multimodal
experts"): the invariants with an image in the input for the families people fine-tune, `vision: drop`, the
processor beside the checkpoint, and loading by path in a fresh process."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from family_sweep import METHODS
from multimodal_models import image_inputs, make_image_text_model, tiny_llava_processor
from multimodal_sweep import ATOL, build_family, check_method, logits, markdown_table, recipe

import moekit  # noqa: F401  (registers the Auto classes)
from moekit import MixtureKitError, compose

NAMED = ["gemma3", "gemma4", "mistral3", "qwen3_vl", "qwen3_5", "llava"]
# Every other image-text family, and these through the same checks: tests/test_every_image_text_family.py.


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("image-text"), {}

    def get(model_type):
        if model_type not in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[model_type] = build_family(model_type, root)
        return built[model_type]
    return root, get


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", NAMED)
def test_named_families_keep_the_invariants_with_an_image(families, model_type, method):
    root, get = families
    models, folders = get(model_type)
    outcome = check_method(method, model_type, models, folders, root / model_type / method)
    assert outcome.startswith("passed"), outcome


def test_the_vision_tower_is_averaged_and_the_decoder_routed(families, tmp_path):
    """traditional over three different Gemma 3 wrappers: the vision tower and projector are the mean of the
    experts' (float32), the decoder's FFNs stacked, and the processor files are written beside the checkpoint."""
    _, get = families
    models, folders = get("gemma3")
    (folders[0] / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    from moekit import build_plan, plan_summary

    assert "vision: kept (tower and projector float32 mean over the experts)" in plan_summary(
        build_plan(recipe("traditional", folders)))
    out = compose(recipe("traditional", folders), tmp_path / "out", progress=False)
    assert (out / "preprocessor_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "gemma3" and "AutoModelForImageTextToText" in config["auto_map"]
    tensors = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    states = [m.state_dict() for m in models]
    vision = [k for k in tensors if "vision_tower" in k]
    projector = [k for k in tensors if "multi_modal_projector" in k]
    assert vision and projector
    for name in vision + projector:
        mean = torch.stack([s[name].double() for s in states]).mean(0)
        assert torch.allclose(tensors[name].double(), mean, atol=1e-6), name
    assert any(k.startswith("model.language_model.layers.0.mlp.experts.") for k in tensors)
    assert not any(k.startswith("model.vision_tower") and "experts" in k for k in tensors)


def test_shared_weights_base_copies_the_bases_vision_tower(families, tmp_path):
    _, get = families
    models, folders = get("llava")
    spec = {**recipe("btx", folders[1:]), "base": {"name": "base", "source": str(folders[0])},
            "shared_weights": "base"}
    out = compose(spec, tmp_path / "out", progress=False)
    from transformers import AutoModelForImageTextToText

    composed = AutoModelForImageTextToText.from_pretrained(out)
    base = models[0].state_dict()
    for name, tensor in composed.state_dict().items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert torch.equal(tensor, base[name]), name


@pytest.mark.parametrize("method", ["btx", "bts"])
def test_vision_drop_writes_the_language_model_alone(families, tmp_path, method):
    """Identical Gemma 3 copies (bts: initial stitches) composed with vision: drop: a text-only checkpoint (no vision
    tensor, the text config) that answers text as the dense wrapper (the hub) does."""
    from transformers import AutoModelForCausalLM

    _, get = families
    models, folders = get("gemma3")
    sources = folders if method == "bts" else [folders[0]] * 2
    out = compose({**recipe(method, sources), "vision": "drop"}, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "gemma3_text"
    assert "AutoModelForImageTextToText" not in config["auto_map"]
    names = [k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    assert names and not any("vision" in k or "projector" in k or "language_model" in k for k in names)
    composed = AutoModelForCausalLM.from_pretrained(out).eval()
    text = {"input_ids": image_inputs("gemma3", models[0].config)["input_ids"][:, :3]}
    assert torch.allclose(logits(composed, text), logits(models[0], text), atol=ATOL)


@pytest.mark.parametrize("method", ["traditional", "bts"])
def test_vision_drop_without_a_text_model_class_is_refused(families, tmp_path, method):
    _, get = families
    _, folders = get("qwen3_vl")
    with pytest.raises(MixtureKitError) as raised:
        compose({**recipe(method, folders[:2]), "vision": "drop"}, tmp_path / "out", progress=False)
    message = str(raised.value)
    assert "qwen3_vl_text" in message and "vision: keep" in message


def test_a_wrappers_own_parameter_is_averaged_and_loaded(families, tmp_path):
    """BLIP-2 keeps its Q-Former's `query_tokens` on the wrapper itself, outside any child module: btx writes the
    experts' float32 mean of it, and the loaded composition holds that value (not an unloaded one)."""
    from transformers import AutoModelForImageTextToText

    _, get = families
    models, folders = get("blip-2")
    out = compose(recipe("btx", folders[:2]), tmp_path / "out", progress=False)
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        stored = f.get_tensor("query_tokens") if "query_tokens" in f.keys() else None
    mean = torch.stack([m.query_tokens.detach().double() for m in models[:2]]).mean(0)
    assert stored is not None and torch.allclose(stored.double(), mean, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.allclose(loaded.query_tokens.detach().double(), mean, atol=1e-6)


@pytest.mark.parametrize("model_type", ["pix2struct", "udop"])
def test_encoder_decoder_image_text_models_are_refused_in_one_sentence(families, tmp_path, model_type):
    _, get = families
    _, folders = get(model_type)
    for method in METHODS:
        with pytest.raises(MixtureKitError, match=f"'{model_type}' is an encoder-decoder model") as raised:
            compose(recipe(method, folders), tmp_path / method, progress=False)
        assert "; " not in str(raised.value) and "decoder-only" in str(raised.value)


def test_bts_refuses_an_image_outside_image_tokens(families, tmp_path):
    """Git prepends its image's embeddings to the text: the hub's sequence is longer than its streams'."""
    _, get = families
    _, folders = get("git")
    with pytest.raises(MixtureKitError, match="bts cannot stitch 'git': its config names no image token"):
        compose(recipe("bts", folders), tmp_path / "out", progress=False)


def test_vision_must_be_keep_or_drop(families, tmp_path):
    _, get = families
    _, folders = get("llava")
    with pytest.raises(MixtureKitError, match="vision.*keep.*drop|keep.*drop.*vision"):
        compose({**recipe("btx", folders[:2]), "vision": "none"}, tmp_path / "out", progress=False)


def test_markdown_table_counts_outcomes():
    from multimodal_sweep import MultimodalResult

    table = markdown_table([MultimodalResult("a", "AForX", {m: "passed" for m in METHODS}),
                            MultimodalResult("b", "BForX", {"traditional": "passed", "btx": "refused: no", "bts": "passed"}),
                            MultimodalResult("c", "not built: ValueError: no"),
                            MultimodalResult("d", "not runnable in transformers: its forward fails")])
    assert table.startswith("1 of 4 image-text families pass all three methods with an image in the input, 1 more are "
                            "refused by some or all methods and pass the others (2 have a tiny model in the sweep; 1 "
                            "are not built")
    assert "| b | BForX | passed | refused: no | passed |" in table and "| c | — | not built: ValueError: no | | |" in table
    assert "| d | — | not runnable in transformers: its forward fails | | |" in table


def test_not_built_names_whose_limit_it_is():
    """A missing library is this environment's, a family in TRANSFORMERS_LIMITS transformers' own; anything else is
    the harness's gap."""
    from multimodal_sweep import TRANSFORMERS_LIMITS, not_built

    assert not_built("x", ImportError("TimmWrapperModel requires the timm library. Install it")) == (
        "not runnable here: TimmWrapperModel requires the timm library")
    assert not_built("not-a-family", ValueError("no")) == "not built: ValueError: no"
    for family, reason in TRANSFORMERS_LIMITS.items():
        assert not_built(family, RuntimeError("x")) == "not runnable in transformers: " + reason


def test_the_sweep_rewrites_only_the_table_between_its_markers_in_the_docs():
    """`python tests/multimodal_sweep.py` writes its table into docs/architectures.md, and nothing else there."""
    from multimodal_sweep import TABLE_BEGIN, TABLE_END, TABLE_PAGE, with_table

    page = TABLE_PAGE.read_text(encoding="utf-8")
    table = page[page.index(TABLE_BEGIN) + len(TABLE_BEGIN) + 1:page.index(TABLE_END) - 1]
    assert table.splitlines()[2] == "| model type | class | traditional | btx | bts |"
    assert with_table(page, table) == page
    before, after = page.split(f"{TABLE_BEGIN}\n{table}\n{TABLE_END}")
    assert with_table(page, "1 of 1 ...") == f"{before}{TABLE_BEGIN}\n1 of 1 ...\n{TABLE_END}{after}"


def test_the_docs_table_is_the_expected_outcomes():
    """The docs' image-text table is what tests/image_text_expectations.json records (both are written by the sweep)."""
    from multimodal_sweep import TABLE_BEGIN, TABLE_END, TABLE_PAGE, read_expectations

    page = TABLE_PAGE.read_text(encoding="utf-8")
    table = page[page.index(TABLE_BEGIN) + len(TABLE_BEGIN) + 1:page.index(TABLE_END) - 1]
    assert table == markdown_table(read_expectations()[1])


def test_a_partial_sweep_replaces_its_rows_and_keeps_the_others(monkeypatch, tmp_path):
    """`python tests/multimodal_sweep.py TYPE...` replaces those families' expected outcomes and keeps the others, in
    the sweep's order; on another release than the file's it refuses (outcomes differ by release)."""
    import multimodal_sweep
    from multimodal_sweep import MultimodalResult, read_expectations, with_resweep, write_expectations

    _, old = read_expectations()
    old = [r for r in old if r.model_type in multimodal_sweep.image_text_types()]  # this release's families
    monkeypatch.setattr(multimodal_sweep, "EXPECTATIONS", tmp_path / "expectations.json")
    write_expectations(old)
    redone = MultimodalResult("llava", "LlavaForConditionalGeneration",
                              {"traditional": "passed", "btx": "refused: why", "bts": "passed"})
    results = with_resweep([redone])
    assert [r.model_type for r in results] == [r.model_type for r in old]
    assert [r for r in results if r.model_type == "llava"] == [redone]
    assert [r for r in results if r.model_type != "llava"] == [r for r in old if r.model_type != "llava"]
    import transformers

    text = (tmp_path / "expectations.json").read_text().replace(f'"transformers": "{transformers.__version__}"',
                                                                 '"transformers": "0.0.1"')
    (tmp_path / "expectations.json").write_text(text)
    with pytest.raises(SystemExit, match="sweep every family"):
        with_resweep([redone])


PIPELINE = """
    import sys, json, torch
    from PIL import Image
    from transformers import pipeline
    path, trust = sys.argv[1], sys.argv[2] == "remote"
    image = Image.fromarray((torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    answer = pipeline("image-text-to-text", model=path, trust_remote_code=trust)(
        text=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "w5 w6"}]}],
        generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    print(json.dumps({"answer": answer[0]["generated_text"][-1]["content"], "moekit": "moekit" in sys.modules}))
"""


def test_pipeline_answers_from_a_composed_checkpoint_in_a_fresh_process(families, tmp_path):
    """The processor saved beside the dense source is written beside the composition, which then answers
    `pipeline("image-text-to-text", model=path)` by path (trust_remote_code runs the loader files) in a process
    that never imported moekit: as the dense model answers, for identical experts."""
    from test_load_by_path import _run

    _, get = families
    _, folders = get("llava")
    processor_source = tmp_path / "dense"
    import shutil

    shutil.copytree(folders[0], processor_source)
    tiny_llava_processor().save_pretrained(processor_source)
    out = compose(recipe("traditional", [processor_source] * 2), tmp_path / "composed", progress=False)
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    dense = _run(PIPELINE, str(processor_source), "local")
    composed = _run(PIPELINE, str(out), "remote")
    assert dense.returncode == 0 and composed.returncode == 0, composed.stderr[-3000:] + dense.stderr[-2000:]
    dense_answer = json.loads(dense.stdout.strip().splitlines()[-1])
    composed_answer = json.loads(composed.stdout.strip().splitlines()[-1])
    assert composed_answer["moekit"] and not dense_answer["moekit"]
    assert composed_answer["answer"] == dense_answer["answer"] and composed_answer["answer"].strip()


@pytest.mark.parametrize("method", ["btx", "bts"])
def test_routing_report_works_on_a_multimodal_composition(families, tmp_path, method):
    """`moekit report` on an image-text composition, with text prompts: every token routed (btx) or gated (bts) in
    the trace, and the HTML written."""
    from typer.testing import CliRunner

    from moekit import capture_routing, load
    from moekit.loading import load_tokenizer
    from moekit.cli import app

    _, get = families
    _, folders = get("llava")
    source = tmp_path / "dense"
    import shutil

    shutil.copytree(folders[0], source)
    tiny_llava_processor().save_pretrained(source)
    out = compose(recipe(method, [source, folders[1], folders[2]]), tmp_path / "composed", progress=False)
    trace = capture_routing(load(out), load_tokenizer(out), ["w5 w6 w7 w8", "w9 w10"], ["a", "b"])
    table = trace.gates if method == "bts" else trace.routes
    assert set(table["text_index"]) == {0, 1} and set(table["token"]) >= {"w5", "w10"}
    done = CliRunner().invoke(app, ["report", str(out), "--text", "w5 w6 w7", "-o", str(tmp_path / "report.html")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "report.html").stat().st_size > 1000
