"""Recipes from YAML and from the original MixtureKit dict, `build_moe`, and the command line."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.distribution import install_instruction
from moekit import Recipe, build_moe, load_recipe
from moekit.cli import app
from tiny_models import VOCAB, make_model, save_model, tiny_config


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [save_model(make_model(tiny_config("qwen3"), seed), root / f"q{seed}") for seed in range(3)]


def test_yaml_round_trip(tmp_path, experts):
    recipe = load_recipe({"method": "btx", "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)],
                          "router_layers": ["mlp.up_proj"], "alpha": 0.1, "shard_size": "1MB"})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert recipe.top_k == 2 and recipe.shard_bytes == 10**6


def test_original_mixturekit_config_is_accepted(tmp_path, experts, monkeypatch):
    legacy = {
        "moe_method": "btx", "model_type": "qwen3x", "num_experts_per_tok": 2,
        "experts": [{"expert_name": "base_expert", "model_id": str(experts[0])},
                    {"expert_name": "expert_1", "model_id": str(experts[1])}],
        "router_layers": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "alpha": 0, "router_layers_index": [],
    }
    recipe = load_recipe(legacy)
    assert isinstance(recipe, Recipe)
    assert [e.name for e in recipe.experts] == ["base_expert", "expert_1"]
    assert recipe.output == "models_merge/qwen3x" and recipe.router_layers_index is None and recipe.alpha == 0
    monkeypatch.chdir(tmp_path)
    path = build_moe(legacy, torch_dtype=torch.float32)
    assert path == tmp_path / "models_merge" / "qwen3x"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.expert_names == ["base_expert", "expert_1"]
    assert model(input_ids=torch.randint(3, VOCAB, (1, 5))).logits.shape == (1, 5, VOCAB)



def test_model_card_hashes_every_source_when_hashed_in_parallel(tmp_path, experts, monkeypatch):
    """On a many-core host the sources are hashed by several threads at once; each card line is still its file's."""
    import hashlib

    from moekit import compose

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    recipe = {"method": "btx", "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)]}
    card = (compose(recipe, tmp_path / "out", progress=False) / "README.md").read_text()
    for folder in experts:
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert f"sha256 `{digest}`" in card

def test_legacy_config_with_unknown_key_is_refused():
    from moekit import RecipeError

    with pytest.raises(RecipeError, match="unknown keys"):
        load_recipe({"moe_method": "btx", "experts": [{"expert_name": "a", "model_id": "x"}], "moe_layers": []})


def test_cli_inspect_compose_inspect(tmp_path, experts):
    recipe = {"method": "traditional", "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)],
              "num_experts_per_tok": 1, "router_layers_index": [1]}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    planned = runner.invoke(app, ["inspect", str(recipe_path)])
    assert planned.exit_code == 0, planned.output
    assert "method: traditional" in planned.output and "blocks [1]: routed mlp (whole FFN)" in planned.output
    assert "top-1" in planned.output and not (tmp_path / "out").exists()
    composed = runner.invoke(app, ["compose", str(recipe_path), "-o", str(tmp_path / "out")])
    assert composed.exit_code == 0, composed.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("sha256") == 3
    assert 'from_pretrained("out")' in card and ".moekit-partial" not in card  # the output, not the staging folder
    assert install_instruction() in card and "trust_remote_code=True" in card
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert inspected.exit_code == 0 and "experts (3, top-1): e0, e1, e2" in inspected.output
    again = runner.invoke(app, ["compose", str(recipe_path), "-o", str(tmp_path / "out")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: moe\nexperts: []\n")
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and "error: invalid recipe" in result.output and "Traceback" not in result.output
    plain = tmp_path / "plain"
    save_model(make_model(tiny_config("llama"), 0), plain)
    result = CliRunner().invoke(app, ["inspect", str(plain)])
    assert result.exit_code == 2 and "not a MixtureKit checkpoint" in result.output


def test_sharded_output_loads(tmp_path, experts):
    from moekit import compose

    out = compose({"method": "btx", "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)],
                   "shard_size": "40KB"}, tmp_path / "sharded", progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert all(os.path.getsize(out / s) < 40_000 + 20_000 for s in shards)  # a shard holds at most one oversize tensor
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.randint(3, VOCAB, (1, 4))).logits.isfinite().all()


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage: moekit" in done.stdout and all(c in done.stdout for c in ("compose", "inspect", "export"))


def test_routing_loss_settings_go_from_the_recipe_into_the_checkpoint(tmp_path, experts):
    """alpha_mode, load_floor, alpha_max, the z-loss and the experts backend are recipe settings, written to config."""
    settings = {"alpha_mode": "auto", "load_floor": 0.2, "alpha_max": 0.5, "router_z_loss_coef": 0.001,
                "experts_backend": "loop"}
    recipe = {"method": "traditional", "experts": [{"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)],
              **settings}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = CliRunner().invoke(app, ["compose", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert {key: getattr(model.config, key) for key in settings} == settings
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump({**recipe, "alpha_mode": "automatic"}))
    wrong = CliRunner().invoke(app, ["inspect", str(tmp_path / "wrong.yaml")])
    assert wrong.exit_code == 2 and "alpha_mode" in wrong.output and "'auto'" in wrong.output, wrong.output
