"""The routing report on an image-text composition read with an image: the image's positions are labelled as image
features (not as their special token), and the routing at every text position is the model's own, recomputed here in
float64 from the router logits of a forward run without moekit's analysis on independently built inputs."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from multimodal_models import IMAGE_TOKEN, image_inputs, tiny_llava_processor
from multimodal_sweep import build_family, recipe

from moekit import MixtureKitError, capture_routing, capture_routing_of_inputs, compose, load, load_processor
from moekit.analysis import IMAGE_TOKEN_LABEL
from moekit.cli import app
from moekit.loading import load_tokenizer
from moekit.views import write_report

IMAGE_FEATURES = 16  # the tiny LLaVA tower: (32 / 8)^2 patches, CLS dropped
WORDS = {f"w{i}": i for i in range(3, 100)}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """Three different tiny LLaVA models (the first saved with its offline processor) and their compositions."""
    root = tmp_path_factory.mktemp("report-images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models, folders = build_family("llava", root)
    source = root / "with-processor"
    shutil.copytree(folders[0], source)
    tiny_llava_processor().save_pretrained(source)
    composed = {method: compose(recipe(method, [source, folders[1], folders[2]]), root / method, progress=False)
                for method in ("traditional", "btx", "bts")}
    tokenizer_only = root / "with-tokenizer"  # a tokenizer but no image processor beside it
    shutil.copytree(folders[0], tokenizer_only)
    tiny_llava_processor().tokenizer.save_pretrained(tokenizer_only)
    bare = compose(recipe("btx", [tokenizer_only, *folders[1:]]), root / "no-processor", progress=False)
    return models, composed, bare


def _picture(seed: int = 0) -> Image.Image:
    pixels = torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(seed)) * 255
    return Image.fromarray(pixels.byte().numpy())


def _reference_routes(model, inputs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per router, each token's probabilities (float64 softmax of the router logits) and its top-k experts, from a
    plain forward of the composed model."""
    with torch.no_grad():
        output = model(**inputs, output_router_logits=True, use_cache=False)
    probs = [torch.softmax(logits.double(), dim=-1) for logits in output.router_logits]
    k = model.config.num_experts_per_tok
    return probs, [p.argsort(dim=-1, descending=True, stable=True)[:, :k] for p in probs]


def _assert_routes_match(trace, text_index: int, ids: list[int], probs, experts, positions) -> None:
    routes = trace.routes[trace.routes["text_index"] == text_index]
    routers = list(dict.fromkeys(routes["router"]))
    assert len(routers) == len(probs) > 0
    for router, reference, top in zip(routers, probs, experts):
        rows = routes[routes["router"] == router].set_index("position")
        assert list(rows.index) == list(range(len(ids)))
        for position in positions:
            row = rows.loc[position]
            assert torch.allclose(torch.tensor(row["probs"], dtype=torch.float64), reference[position], atol=1e-5)
            assert sorted(row["experts"]) == sorted(top[position].tolist())
            chosen = reference[position][top[position]]
            assert torch.allclose(torch.tensor(sorted(row["weights"]), dtype=torch.float64),
                                  (chosen / chosen.sum()).sort().values, atol=1e-5)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_text_positions_route_as_the_model_does_and_image_positions_are_labelled(llava, method):
    _, composed, _ = llava
    path = composed[method]
    model, tokenizer, processor = load(path), load_tokenizer(path), load_processor(path)
    picture = _picture()
    trace = capture_routing(model, tokenizer, ["w5 w6 w7", "w8 w9"], ["with image", "alone"],
                            images=[picture, None], processor=processor)

    # the reference inputs, built without the processor's text side: 16 image tokens, then the words
    ids = [IMAGE_TOKEN] * IMAGE_FEATURES + [WORDS["w5"], WORDS["w6"], WORDS["w7"]]
    pixels = processor.image_processor(picture, return_tensors="pt")["pixel_values"]
    probs, experts = _reference_routes(model, {"input_ids": torch.tensor([ids]), "pixel_values": pixels})
    routes = trace.routes[trace.routes["text_index"] == 0].drop_duplicates("position").sort_values("position")
    assert list(routes["image"]) == [True] * IMAGE_FEATURES + [False] * 3
    assert list(routes["token"]) == [IMAGE_TOKEN_LABEL] * IMAGE_FEATURES + ["w5", "w6", "w7"]
    _assert_routes_match(trace, 0, ids, probs, experts, range(IMAGE_FEATURES, len(ids)))

    # the image is really read: the same words after the image tokens without their pixels route otherwise
    without = capture_routing(model, tokenizer, ["w5 w6 w7"])
    alone = without.routes.set_index(["router", "position"])["probs"]
    differs = [not torch.allclose(torch.tensor(row["probs"]), torch.tensor(alone[(row["router"], row["position"] - 16)]))
               for _, row in trace.routes[(trace.routes["text_index"] == 0) & ~trace.routes["image"]].iterrows()]
    assert any(differs)

    # a text read alone beside it keeps working, with no image position
    text_alone = trace.routes[trace.routes["text_index"] == 1]
    assert set(text_alone["token"]) == {"w8", "w9"} and not text_alone["image"].any()
    words = [WORDS["w8"], WORDS["w9"]]
    probs, experts = _reference_routes(model, {"input_ids": torch.tensor([words])})
    _assert_routes_match(trace, 1, words, probs, experts, range(2))


def test_inputs_with_pixel_values_are_analysed_without_a_processor(llava):
    """The API path for inputs a caller prepared: LLaVA's processor-free convention (`multimodal_models`)."""
    models, composed, _ = llava
    path = composed["btx"]
    model = load(path)
    inputs = image_inputs("llava", models[0].config, seed=3)
    ids = inputs["input_ids"][0].tolist()
    trace = capture_routing_of_inputs(model, load_tokenizer(path), [dict(inputs)], ["pixels"])
    image_positions = [i for i, token in enumerate(ids) if token == IMAGE_TOKEN]
    rows = trace.routes.drop_duplicates("position").sort_values("position")
    assert [p for p, image in zip(rows["position"], rows["image"]) if image] == image_positions
    assert set(rows[rows["image"]]["token"]) == {IMAGE_TOKEN_LABEL}
    assert len(image_positions) == IMAGE_FEATURES
    probs, experts = _reference_routes(model, dict(inputs))
    _assert_routes_match(trace, 0, ids, probs, experts, [i for i in range(len(ids)) if i not in image_positions])


def test_bts_gates_label_image_positions(llava):
    _, composed, _ = llava
    path = composed["bts"]
    trace = capture_routing(load(path), load_tokenizer(path), ["w5 w6"], images=[_picture()],
                            processor=load_processor(path))
    gates = trace.gates.drop_duplicates("position").sort_values("position")
    assert trace.routes.empty and list(gates["image"]) == [True] * IMAGE_FEATURES + [False] * 2
    assert list(gates["token"]) == [IMAGE_TOKEN_LABEL] * IMAGE_FEATURES + ["w5", "w6"]


def test_the_html_report_styles_image_positions(llava, tmp_path):
    _, composed, _ = llava
    path = composed["btx"]
    trace = capture_routing(load(path), load_tokenizer(path), ["w5 w6 w7"], images=[_picture()],
                            processor=load_processor(path))
    html = write_report(trace, tmp_path / "report.html").read_text()
    assert html.count('class="tok image-token"') == IMAGE_FEATURES
    assert html.count("&lt;image&gt;</span>") == IMAGE_FEATURES
    assert '<span class="tok" data-text="0" data-pos="16">w5</span>' in html


def test_an_image_is_never_cut_through(llava):
    _, composed, _ = llava
    path = composed["btx"]
    model, tokenizer, processor = load(path), load_tokenizer(path), load_processor(path)
    with pytest.raises(MixtureKitError, match="raise max_tokens .* to at least 16"):
        capture_routing(model, tokenizer, ["w5 w6"], images=[_picture()], processor=processor, max_tokens=10)
    trace = capture_routing(model, tokenizer, ["w5 w6 w7"], images=[_picture()], processor=processor, max_tokens=17)
    assert trace.truncated == [True] and sorted(set(trace.routes["position"])) == list(range(17))


def test_report_command_with_an_image(llava, tmp_path):
    _, composed, _ = llava
    picture = tmp_path / "picture.png"
    _picture().save(picture)
    done = CliRunner().invoke(app, ["report", str(composed["traditional"]), "--text", "w5 w6 w7", "--text", "w8",
                                    "--image", str(picture), "-o", str(tmp_path / "report.html"),
                                    "--png-dir", str(tmp_path / "png")])
    assert done.exit_code == 0, done.output
    html = (tmp_path / "report.html").read_text()
    assert html.count("image-token") >= IMAGE_FEATURES and (tmp_path / "png" / "token_strip_1.png").is_file()


def test_report_command_refuses_images_it_cannot_read(llava, tmp_path):
    _, composed, bare = llava
    picture = tmp_path / "picture.png"
    _picture().save(picture)
    runner = CliRunner()
    missing = runner.invoke(app, ["report", str(bare), "--text", "w5", "--image", str(picture),
                                  "-o", str(tmp_path / "a.html")])
    assert missing.exit_code == 2 and "has no processor" in missing.output
    too_many = runner.invoke(app, ["report", str(composed["btx"]), "--text", "w5", "--image", str(picture),
                                   "--image", str(picture), "-o", str(tmp_path / "b.html")])
    assert too_many.exit_code == 2 and "2 --image for 1 texts" in too_many.output
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("w5")
    unreadable = runner.invoke(app, ["report", str(composed["btx"]), "--text", "w5", "--image", str(not_an_image),
                                     "-o", str(tmp_path / "c.html")])
    assert unreadable.exit_code == 2 and "cannot read an image" in unreadable.output


def test_the_image_goes_where_the_text_has_its_image_token(llava):
    _, composed, _ = llava
    path = composed["btx"]
    trace = capture_routing(load(path), load_tokenizer(path), ["w5 <image> w6"], images=[_picture()],
                            processor=load_processor(path))
    rows = trace.routes.drop_duplicates("position").sort_values("position")
    assert list(rows["token"]) == ["w5"] + [IMAGE_TOKEN_LABEL] * IMAGE_FEATURES + ["w6"]
    assert list(rows["image"]) == [False] + [True] * IMAGE_FEATURES + [False]
