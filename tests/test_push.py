"""`moekit push`: exactly which files and which card would reach the Hub, through huggingface_hub's public HfApi
methods (mocked: no network), and refusals before any upload."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from huggingface_hub import HfApi
from typer.testing import CliRunner

import moekit
from moekit.cli import app
from moekit.distribution import install_instruction
from moekit.publishing import PushError, plan_upload, push
from tiny_models import make_model, save_model, tiny_config


@pytest.fixture
def hub(monkeypatch):
    """Record every HfApi call a push makes (the public methods it uses), and fail on any other network call."""
    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return type("Commit", (), {"commit_url": "https://huggingface.co/org/moe/commit/abc"})()
        return method

    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("push must commit once, not upload a folder"))
    return calls


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    sources = [save_model(make_model(tiny_config("llama"), seed), root / f"src{seed}") for seed in range(2)]
    path = moekit.compose({"method": "btx", "num_experts_per_tok": 1, "alpha": 0.03,
                           "experts": [{"name": n, "source": str(s)} for n, s in zip(("code", "math"), sources)]},
                          root / "composed", progress=False)
    return path


def test_push_sends_the_checkpoint_and_a_card_in_one_commit(composed, tmp_path, hub):
    folder = shutil.copytree(composed, tmp_path / "c")
    (folder / "eval.json").write_text(json.dumps({"perplexity": {"code": 3.25, "math": 4.5}}))
    (folder / "routing.png").write_bytes(b"\x89PNG fake")
    (folder / "optimizer.pt").write_bytes(b"state")  # never uploaded
    (folder / "checkpoint-10").mkdir()  # a training checkpoint: stays behind
    url = push(folder, "org/moe", private=True, revision="v1", commit_message="first")
    assert url.endswith("/commit/abc")
    names = [call[0] for call in hub]
    assert names == ["create_repo", "create_branch", "create_commit"]
    assert hub[0][2]["private"] is True and hub[0][1][0] == "org/moe"
    commit = hub[2][2]
    assert commit["revision"] == "v1" and commit["commit_message"] == "first"
    uploaded = {op.path_in_repo: op for op in commit["operations"]}
    expected = sorted(["config.json", "generation_config.json", "model.safetensors", "mixturekit_recipe.yaml",
                       "configuration_mixturekit.py", "modeling_mixturekit.py", "eval.json", "routing.png",
                       "README.md"])
    assert sorted(uploaded) == expected
    card = uploaded["README.md"].path_or_fileobj.decode("utf-8")
    assert install_instruction() in card and 'from_pretrained("org/moe")' in card
    assert "method: `btx`" in card and "experts per token (k): 1 of 2" in card and "alpha: 0.03" in card
    assert "| expert | code | `<local>/src0` |" in card and "| expert | math | `<local>/src1` |" in card
    assert str(composed.parent) not in card  # no local path leaks into a public card, nor into the recipe
    recipe = uploaded["mixturekit_recipe.yaml"].path_or_fileobj.decode("utf-8")
    assert str(composed.parent) not in recipe and yaml.safe_load(recipe)["experts"][0]["source"] == "<local>/src0"
    assert "![routing](routing.png)" in card and "| perplexity / code | 3.25 |" in card
    assert card.startswith("---\nlibrary_name: transformers")


def test_an_incomplete_checkpoint_is_refused_before_any_call(composed, tmp_path, hub):
    folder = shutil.copytree(composed, tmp_path / "c")
    (folder / "modeling_mixturekit.py").unlink()
    with pytest.raises(PushError, match=r"missing modeling_mixturekit.py \(named by the config's auto_map\)"):
        push(folder, "org/moe")
    (folder / "config.json").unlink()
    with pytest.raises(PushError, match="config.json is missing"):
        push(folder, "org/moe")
    sharded = shutil.copytree(composed, tmp_path / "s")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(PushError, match="missing model-00001.safetensors"):
        push(sharded, "org/moe")
    assert hub == []


def test_an_export_is_pushed_as_a_native_model(composed, tmp_path, hub):
    from moekit import export

    traditional_sources = yaml.safe_load((composed / "mixturekit_recipe.yaml").read_text())["experts"]
    path = moekit.compose({"method": "traditional", "experts": traditional_sources}, tmp_path / "t", progress=False)
    exported = export(path, "mixtral", tmp_path / "mixtral")
    upload = plan_upload(exported, "org/mixtral")
    assert "no MixtureKit needed" in upload.card and not any(name.endswith(".py") for name in upload.files)
    push(exported, "org/mixtral")
    assert [c[0] for c in hub] == ["create_repo", "create_commit"]


def test_cli_push_dry_run_lists_and_uploads_nothing(composed, hub):
    result = CliRunner().invoke(app, ["push", str(composed), "org/moe", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "## Composition" in result.output and hub == []
    missing = CliRunner().invoke(app, ["push", str(composed.parent / "nope"), "org/moe"])
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_an_added_experts_local_source_is_redacted_from_card_and_config(composed, tmp_path, hub):
    """`moekit edit --add` records the new expert's source in config.json and the card: a push sends neither path."""
    source = save_model(make_model(tiny_config("llama"), 7), tmp_path / "private-law-expert")
    edited = moekit.add_expert(composed, "law", source, tmp_path / "edited")
    assert str(source) in (edited / "config.json").read_text() and str(source) in (edited / "README.md").read_text()
    upload = plan_upload(edited, "org/moe")
    config = upload.files["config.json"].decode("utf-8")
    assert str(source) not in config and "<local>/private-law-expert" in config
    assert json.loads(config)["edits"][-1]["source"] == "<local>/private-law-expert"
    assert str(source) not in upload.card and str(tmp_path) not in upload.card
