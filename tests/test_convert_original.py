"""`moekit convert-original`: checkpoints built (and "trained") by the original MixtureKit itself, the registry's
`mixturekit` 1.1.1 installed into a folder of its own during the run, become moekit checkpoints that give the logits
its own model gives on the same weights, where that model is right, and the dense model where its experts are one.

The original's code only runs in a subprocess that puts its folder first on sys.path; this process never imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from moekit.cli import app
from moekit.original import OriginalCheckpointError, convert_original
from moekit.distribution import OTHER_DISTRIBUTION
from moekit.errors import MixtureKitError
from moekit.runtime.base_model.cache_argument import CACHE_ARGUMENT
from tiny_models import VOCAB, make_model, save_model, tiny_config

OTHER_RELEASE = f"{OTHER_DISTRIBUTION}==1.1.1"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
INPUT_IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
BLOCKS = 4

# name: (their build config's varying keys, experts by seed, how to "train" it: None = as built)
CASES = {
    # 3 experts, top-2: the choice and the renormalised weights matter
    "traditional": ({"moe_method": "traditional", "num_experts_per_tok": 2}, [0, 1, 2], "random"),
    # top-1 over 3 experts, FFN and attention projections, in two of four blocks
    "btx": ({"moe_method": "btx", "num_experts_per_tok": 1, "router_layers_index": [0, 2],
             "router_layers": ["mlp.gate_proj", "mlp.down_proj", "self_attn.q_proj"]}, [0, 1, 2], "random"),
    # stitches after blocks 1 (broadcast) and 3 (merge), three streams
    "bts": ({"moe_method": "bts", "stitch_layers_index": [1]}, [0, 1, 2], "random"),
    "bts_as_built": ({"moe_method": "bts", "stitch_layers_index": [1]}, [0, 1], None),
    # stitch_freq 1: after blocks 1 (broadcast), 2 (merge) and 3 (merge), the original's order
    "bts_two_merges": ({"moe_method": "bts", "stitch_freq": 1}, [0, 1], "random"),
    "bts_two_merges_identity": ({"moe_method": "bts", "stitch_freq": 1}, [0, 1], "random, identity at merges"),
    # fresh builds of one model twice: no routers stored (expert 3 ties its LM head to its embeddings)
    "traditional_one_model": ({"moe_method": "traditional", "num_experts_per_tok": 1}, [3, 3], None),
    # `gate_proj` (not `mlp.gate_proj`): its build routes it, its modeling file does not find it
    "btx_short_names": ({"moe_method": "btx", "num_experts_per_tok": 1,
                         "router_layers": ["gate_proj", "up_proj", "down_proj"]}, [0, 0], None),
}

BUILD_AND_SCORE = """
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from MixtureKit import build_moe
    from transformers import AutoModelForCausalLM
    from safetensors.torch import save_file
    import MixtureKit
    assert MixtureKit.__file__.startswith(sys.argv[1]), MixtureKit.__file__
    work, cases, experts = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    input_ids = torch.tensor(json.loads(sys.argv[5]))
    logits = {}
    for name, (fields, seeds, training) in cases.items():
        config = {"model_type": "tiny" + name.replace("_", ""), "alpha": 0.01,
                  "experts": [{"expert_name": f"e{i}", "model_id": experts[str(s)]} for i, s in enumerate(seeds)],
                  **fields}
        folder = build_moe(config, torch_dtype=torch.float32, output_dir=f"{work}/{name}")
        if training:  # what its training changes: routers and stitches, here seeded random values
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            generator = torch.Generator().manual_seed(len(name))
            layers = model.model.layers
            with torch.no_grad():
                for key, weight in model.named_parameters():
                    if key.endswith(".gate.weight"):
                        weight.copy_(torch.randn(weight.shape, generator=generator))
                    elif ".stitches.w_gate." in key:
                        weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
                    elif ".stitches.w_proj." in key:
                        weight.copy_(torch.eye(weight.shape[0]) + 0.2 * torch.randn(weight.shape, generator=generator))
                if "identity at merges" in training:
                    for layer in layers[:-1]:
                        if hasattr(layer, "stitches") and layer.stitches.merge_into_hub:
                            for projection in layer.stitches.w_proj:
                                projection.weight.copy_(torch.eye(projection.weight.shape[0]))
            folder = f"{work}/{name}_trained"
            model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(input_ids, use_cache=False).logits.contiguous()
            logits[name + ".cached"] = model(input_ids).logits.contiguous()
        print("built", name, folder)
    save_file(logits, f"{work}/their_logits.safetensors")
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    return done


def _expert(seed: int, folder: Path, tied: bool = False) -> Path:
    """A tiny Llama with a tokenizer (the original's build saves the first expert's tokenizer with the model)."""
    save_model(make_model(tiny_config("llama", num_hidden_layers=BLOCKS, tie_word_embeddings=tied), seed), folder)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", bos_token="w1", eos_token="w2",
                            unk_token="w3").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original release from the registry, in a folder of its own; its checkpoints and their logits."""
    root = tmp_path_factory.mktemp("original")
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(root / "wheel"), OTHER_RELEASE])
    [wheel] = (root / "wheel").glob(f"{OTHER_DISTRIBUTION}-*.whl")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(root / "site"), str(wheel)])
    experts = {str(seed): str(_expert(seed, root / f"expert{seed}", tied=seed == 3)) for seed in (0, 1, 2, 3)}
    built = _run([sys.executable, "-c", textwrap.dedent(BUILD_AND_SCORE), str(root / "site"), str(root / "built"),
                  json.dumps(CASES), json.dumps(experts), json.dumps(INPUT_IDS.tolist())], env=OFFLINE, cwd=root)
    folders = dict(line.split()[1:] for line in built.stdout.splitlines() if line.startswith("built "))
    return {"folders": {name: Path(path) for name, path in folders.items()}, "experts": experts,
            "logits": load_file(root / "built" / "their_logits.safetensors")}


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return {name: convert_original(folder, out / name, progress=False) for name, folder in original["folders"].items()}


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # import moekit, no remote code
    with torch.no_grad():
        return model(INPUT_IDS).logits


@pytest.mark.slow
@pytest.mark.parametrize("case", ["traditional", "btx", "bts", "bts_as_built", "bts_two_merges_identity"])
def test_same_logits_as_the_original_with_its_trained_routers_and_stitches(original, converted, case):
    conversion = converted[case]
    assert conversion.same_logits, conversion.notes
    cache, as_built = "use_cache=False", "as its build writes them"
    assert [n for n in conversion.notes if cache not in n and as_built not in n] == [], conversion.notes
    assert any(as_built in n for n in conversion.notes) == (case == "bts_as_built")
    config = json.loads((conversion.path / "config.json").read_text())
    assert config["model_type"] == "mixturekit" and not list(conversion.path.glob("modeling_tiny*.py"))
    theirs = original["logits"][case]
    dense = _logits(Path(original["experts"]["0"]))
    assert (theirs - dense).abs().max() > 1e-2  # a composition that is not the first expert in disguise
    torch.testing.assert_close(_logits(conversion.path), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_originals_bts_expert_layers_share_the_hubs_cache_from_transformers_5_24(original, converted):
    """Its layer looks for `past_key_values`; from 5.24 the cache comes as `cache`, reaches its expert layers as the
    hub's, and they attend over the hub's keys and values as well: with a cache (a forward's default) its logits are
    not the BTS model's. Without one they equal ours (above); the converter says so."""
    renamed = CACHE_ARGUMENT == "cache"
    for case in ("bts", "bts_as_built"):
        cached, uncached = original["logits"][f"{case}.cached"], original["logits"][case]
        assert ((cached - uncached).abs().max() > 1e-3) == renamed
        assert any("use_cache=False" in note for note in converted[case].notes)
    for case in ("traditional", "btx"):  # routed methods leave the cache alone
        torch.testing.assert_close(original["logits"][f"{case}.cached"], original["logits"][case], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_routers_and_stitches_are_the_trained_ones(original, converted):
    theirs = load_file(original["folders"]["traditional"] / "model.safetensors")
    ours = load_file(converted["traditional"].path / "model.safetensors")
    assert torch.equal(ours["model.layers.3.mlp.gate.weight"], theirs["model.layers.3.mlp.gate.weight"])
    gate_up = ours["model.layers.3.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[2], torch.cat([theirs["model.layers.3.mlp.experts.2.gate_proj.weight"],
                                              theirs["model.layers.3.mlp.experts.2.up_proj.weight"]]))
    theirs = load_file(original["folders"]["btx"] / "model.safetensors")
    ours = load_file(converted["btx"].path / "model.safetensors")
    assert torch.equal(ours["model.layers.2.self_attn.q_proj.router.weight"],
                       theirs["model.layers.2.self_attn.q_proj.gate.weight"])
    assert "model.layers.1.self_attn.q_proj.weight" in ours and "model.layers.1.mlp.gate_proj.router.weight" not in ours
    config = json.loads((converted["bts_two_merges"].path / "config.json").read_text())
    assert config["stitch_layers_index"] == [1, 2, 3]
    assert config["stitch_directions"] == ["broadcast", "merge", "merge"]  # the original's order, not ours
    theirs = load_file(original["folders"]["bts"] / "model.safetensors")
    ours = load_file(converted["bts"].path / "model.safetensors")
    assert torch.equal(ours["stitches.1.gate.weight"],
                       torch.cat([theirs[f"model.layers.3.stitches.w_gate.{j}.weight"] for j in range(3)]))
    assert torch.equal(ours["stitches.0.gates.1.weight"], theirs["model.layers.1.stitches.w_gate.2.weight"])
    assert torch.equal(ours["streams.e2.layers.2.mlp.up_proj.weight"],
                       theirs["model.expert_layers.2.1.mlp.up_proj.weight"])


@pytest.mark.slow
def test_a_merge_before_the_last_differs_by_the_originals_projected_expert_streams(original, converted):
    """With projections that are not the identity at its stitch after block 2 (a merge), the original continues the
    expert stream from its projection; ours from its own state, as the paper does. Said, and visible in the logits;
    the same weights with identity projections there agree exactly (test above), so that is the only difference."""
    conversion = converted["bts_two_merges"]
    assert not conversion.same_logits and "after block 2 merges into the hub before the last one" in conversion.notes[0]
    assert (_logits(conversion.path) - original["logits"]["bts_two_merges"]).abs().max() > 1e-3
    assert "continue from their own states" in (conversion.path / "README.md").read_text()


@pytest.mark.slow
def test_builds_of_one_model_give_the_dense_model_where_the_original_does_not(original, converted):
    # traditional: no routers stored (its model draws them at each load); any router gives the dense model, in both
    conversion, tied = converted["traditional_one_model"], Path(original["experts"]["3"])
    assert not conversion.same_logits and "routers are not in the checkpoint" in conversion.notes[0]
    assert json.loads((conversion.path / "config.json").read_text())["text_config"]["tie_word_embeddings"]
    torch.testing.assert_close(_logits(conversion.path), _logits(tied), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(original["logits"]["traditional_one_model"], _logits(tied), atol=1e-5, rtol=1e-5)
    dense = _logits(Path(original["experts"]["0"]))
    # btx with `gate_proj`: its model never routes them and draws the dense projections at random; ours routes them
    conversion = converted["btx_short_names"]
    assert "are not paths inside a block" in conversion.notes[0]
    assert json.loads((conversion.path / "config.json").read_text())["router_layers"] == [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    torch.testing.assert_close(_logits(conversion.path), dense, atol=1e-5, rtol=1e-5)
    assert (original["logits"]["btx_short_names"] - dense).abs().max() > 1e-2


@pytest.mark.slow
def test_the_command(original, tmp_path):
    runner = CliRunner()
    assert "--overwrite" in runner.invoke(app, ["convert-original", "--help"]).output
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert-original", str(original["folders"]["btx_short_names"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "not paths inside a block" in result.output
    assert "logits differ" in result.output or "not a function of this checkpoint" in result.output
    assert (out / "README.md").is_file() and (out / "mixturekit_recipe.yaml").is_file()
    again = runner.invoke(app, ["convert-original", str(original["folders"]["bts"]), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert json.loads((out / "config.json").read_text())["method"] == "btx"  # untouched
    replaced = runner.invoke(app, ["convert-original", str(original["folders"]["bts"]), "-o", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and "same logits" in replaced.output, replaced.output
    assert json.loads((out / "config.json").read_text())["method"] == "bts"


def test_refuses_what_the_original_did_not_write(tmp_path):
    dense = save_model(make_model(tiny_config("llama"), 0), tmp_path / "dense")
    result = CliRunner().invoke(app, ["convert-original", str(dense), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not a checkpoint written by the original MixtureKit" in result.output
    assert "model_type 'llama'" in result.output and not (tmp_path / "out").exists()
    with pytest.raises(OriginalCheckpointError, match="no config.json"):
        convert_original(tmp_path, tmp_path / "out")
    with pytest.raises(OriginalCheckpointError, match="is not a folder"):
        convert_original(tmp_path / "nowhere", tmp_path / "out")
    older = tmp_path / "older"
    older.mkdir()
    (older / "config.json").write_text(json.dumps({
        "model_type": "mymoe", "moe_method": "btx", "num_experts": 2, "router_layers": ["mlp.up_proj"],
        "auto_map": {"AutoModelForCausalLM": "modeling_mymoe.MixtureKitForCausalLM"}}))
    with pytest.raises(OriginalCheckpointError, match="older than 1.1.1.*upgrade_checkpoint"):
        convert_original(older, tmp_path / "out")


def test_refuses_a_moekit_checkpoint(tmp_path):
    import moekit

    sources = [save_model(make_model(tiny_config("llama"), s), tmp_path / f"m{s}") for s in range(2)]
    ours = moekit.compose({"method": "traditional", "experts": [{"name": f"e{i}", "source": str(s)}
                                                                for i, s in enumerate(sources)]},
                          tmp_path / "ours", progress=False)
    with pytest.raises(MixtureKitError, match="already a moekit checkpoint"):
        convert_original(ours, tmp_path / "out")


def test_stitch_directions_are_checked():
    """The config field the conversion sets: one direction per stitch point, the last a merge."""
    from moekit import MixtureKitConfig, MixtureKitForCausalLM, RecipeError

    text = tiny_config("llama", num_hidden_layers=BLOCKS)
    for directions in (["merge", "broadcast"], ["broadcast"], ["broadcast", "sideways"]):
        config = MixtureKitConfig(text, method="bts", expert_names=["e1"], expert_configs=[text], num_experts_per_tok=1,
                                  stitch_layers_index=[1, 3], stitch_directions=directions)
        with pytest.raises(RecipeError, match="stitch_directions must give merge or broadcast for each of the 2"):
            with torch.device("meta"):
                MixtureKitForCausalLM(config)
    config = MixtureKitConfig(text, method="bts", expert_names=["e1"], expert_configs=[text], num_experts_per_tok=1,
                              stitch_layers_index=[1, 3], stitch_directions=["merge", "merge"])
    with torch.device("meta"):
        assert [s.direction for s in MixtureKitForCausalLM(config).stitches] == ["merge", "merge"]
    config.stitch_directions = None  # the default: alternating back from the last merge
    with torch.device("meta"):
        assert [s.direction for s in MixtureKitForCausalLM(config).stitches] == ["broadcast", "merge"]
