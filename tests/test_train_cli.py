"""`moekit train` and `moekit eval` on a composed model with a real tokenizer; resuming a run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from typer.testing import CliRunner

from moekit.cli import app
from moekit.training import train_routers
from toy_domains import domain_blocks


def test_cli_trains_routers_then_evaluates(demo, tmp_path):
    root, result, files = demo
    config = {"model": str(root / "btx"), "data": str(files["code"]), "output": str(tmp_path / "trained"),
              "max_steps": 4, "block_size": 32, "batch_size": 4, "learning_rate": 0.05}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert trained.exit_code == 0, trained.output
    before, after = load_file(root / "btx" / "model.safetensors"), {}
    for path in (tmp_path / "trained").glob("*.safetensors"):
        after.update(load_file(path))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("router.weight") for name in changed), changed
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "trained"), "--data", f"code={files['code']}",
                                    "--data", f"prose={files['prose']}", "--block-size", "32",
                                    "--json", str(tmp_path / "eval.json")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "code" in evaluated.output and "prose" in evaluated.output
    assert "eval code" in evaluated.output and "eval prose" in evaluated.output  # a progress bar per dataset
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"code", "prose"} and all(r["perplexity"] > 1 for r in report.values())
    loads = next(iter(report["code"]["routing"].values()))["load"]
    assert len(loads) == 3 and sum(loads) == pytest.approx(1.0, abs=1e-3)
    assert 0 < next(iter(report["code"]["routing"].values()))["load_entropy"] <= 1 and "load entropy" in evaluated.output


def test_cli_eval_scores_in_the_dtype_asked_for_and_refuses_an_unknown_one(demo, tmp_path):
    root, _, files = demo
    runner = CliRunner()
    scores = {}
    for dtype in ("float32", "bfloat16"):
        done = runner.invoke(app, ["eval", str(root / "btx"), "--data", f"code={files['code']}", "--block-size", "32",
                                   "--device", "cpu", "--dtype", dtype, "--json", str(tmp_path / f"{dtype}.json")])
        assert done.exit_code == 0, done.output
        scores[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())["code"]["perplexity"]
    default = runner.invoke(app, ["eval", str(root / "btx"), "--data", f"code={files['code']}", "--block-size", "32",
                                  "--json", str(tmp_path / "default.json")])
    assert default.exit_code == 0, default.output
    # the default on a CPU is float32, exactly; bfloat16 scores the same model a little differently
    assert json.loads((tmp_path / "default.json").read_text())["code"]["perplexity"] == scores["float32"]
    assert scores["bfloat16"] != scores["float32"]
    assert scores["bfloat16"] == pytest.approx(scores["float32"], rel=0.05)
    wrong = runner.invoke(app, ["eval", str(root / "btx"), "--data", f"code={files['code']}", "--dtype", "fp8"])
    assert wrong.exit_code != 0 and "unknown dtype 'fp8'" in wrong.output and "bfloat16" in wrong.output


def test_cli_train_bad_data_is_a_clear_error(demo, tmp_path):
    root, result, files = demo
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for data, message in ((bad, "lacks the column(s) ['text']"), (empty, "cannot load data")):
        config = {"model": str(root / "btx"), "data": str(data), "output": str(tmp_path / "o")}
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(config))
        outcome = CliRunner().invoke(app, ["train", str(tmp_path / "t.yaml")])
        assert outcome.exit_code == 2 and message in outcome.output, outcome.output
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"model": "x", "data": "y", "output": "z", "stepz": 3}))
    outcome = CliRunner().invoke(app, ["train", str(tmp_path / "t.yaml")])
    assert outcome.exit_code == 2 and "stepz" in outcome.output


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(demo, tmp_path):
    root, result, files = demo
    blocks = domain_blocks("a", 64, 16, 3) % 300  # any token ids inside the demo vocabulary
    settings = dict(max_steps=12, learning_rate=0.05, batch_size=4, progress=False, save_steps=6)
    straight = AutoModelForCausalLM.from_pretrained(root / "traditional")
    train_routers(straight, blocks, tmp_path / "straight", **settings)
    interrupted = AutoModelForCausalLM.from_pretrained(root / "traditional")
    train_routers(interrupted, blocks, tmp_path / "resumed", callbacks=[_StopAt(6)], **settings)
    resumed = AutoModelForCausalLM.from_pretrained(root / "traditional")
    train_routers(resumed, blocks, tmp_path / "resumed", resume=True, **settings)
    stopped = {n: p for n, p in interrupted.named_parameters()}
    for name, parameter in straight.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], parameter, atol=1e-6, rtol=0)
    assert any(not torch.equal(stopped[n], p) for n, p in straight.named_parameters())  # the stop was mid-run


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_cli_runs_sft_and_dpo_stages_with_lora(demo, tmp_path, stage):
    root, result, files = demo
    data = tmp_path / f"{stage}.jsonl"
    if stage == "sft":
        rows = [{"text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(8)]
    else:
        rows = [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(root / "traditional"), "stage": stage, "data": str(data), "output": str(tmp_path / "out"),
              "max_steps": 2, "batch_size": 2, "learning_rate": 1e-3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    outcome = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert outcome.exit_code == 0, outcome.output
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    if stage == "dpo":
        rows[0].pop("rejected")
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
        config["output"] = str(tmp_path / "out-2")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        outcome = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
        assert outcome.exit_code == 2 and "rejected" in outcome.output


def test_cli_sft_resumes_from_its_last_checkpoint(demo, tmp_path):
    root, result, files = demo
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": f"x = {i}\n"}) + "\n" for i in range(8)))
    config = {"model": str(root / "btx"), "stage": "sft", "data": str(data), "output": str(tmp_path / "out"),
              "max_steps": 2, "batch_size": 2, "save_steps": 1, "learning_rate": 1e-3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")]).exit_code == 0
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    config["max_steps"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    outcome = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--resume"])
    assert outcome.exit_code == 0, outcome.output
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len([h for h in state["log_history"] if "loss" in h]) >= 1


def test_train_refuses_another_runs_output_and_resumes_only_the_same_run(demo, tmp_path):
    root, result, files = demo
    config = {"model": str(root / "btx"), "data": str(files["code"]), "output": str(tmp_path / "run"),
              "max_steps": 2, "block_size": 32, "batch_size": 4, "save_steps": 1}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tmp_path / "t.yaml")]).exit_code == 0
    first = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}

    again = runner.invoke(app, ["train", str(tmp_path / "t.yaml")])
    assert again.exit_code == 2 and "already holds a run" in again.output and "--overwrite" in again.output
    assert first == {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}

    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**config, "learning_rate": 0.5}))
    other = runner.invoke(app, ["train", str(tmp_path / "other.yaml"), "--resume"])
    assert other.exit_code == 2 and "learning_rate: 0.01 in the run, 0.5 now" in other.output, other.output

    fresh = tmp_path / "never-trained"
    fresh.mkdir()
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump({**config, "output": str(fresh)}))
    orphan = runner.invoke(app, ["train", str(tmp_path / "fresh.yaml"), "--resume"])
    assert orphan.exit_code == 2 and "holds no run" in orphan.output

    (tmp_path / "run" / "checkpoints" / "stale-marker").write_text("from the old run")
    replaced = runner.invoke(app, ["train", str(tmp_path / "t.yaml"), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (tmp_path / "run" / "checkpoints" / "stale-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no old run left aside

    notes = tmp_path / "notes"  # --overwrite replaces a run, never a folder of the user's files
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    (tmp_path / "notes.yaml").write_text(yaml.safe_dump({**config, "output": str(notes)}))
    refused = runner.invoke(app, ["train", str(tmp_path / "notes.yaml"), "--overwrite"])
    assert refused.exit_code == 2 and "holds notes.txt, which moekit did not write" in refused.output, refused.output
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]


def test_a_misspelled_local_path_is_an_error_at_once_naming_it(demo, tmp_path):
    import time

    root, result, files = demo
    runner = CliRunner()
    start = time.perf_counter()
    missing_data = runner.invoke(app, ["eval", str(root / "btx"), "--data", "code=data/mixd.jsonl"])
    missing_model = runner.invoke(app, ["eval", str(tmp_path / "composd"), "--data", f"code={files['code']}"])
    config = {"model": str(root / "btx"), "data": "./data/mixd.jsonl", "output": str(tmp_path / "o")}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(config))
    missing_train_data = runner.invoke(app, ["train", str(tmp_path / "t.yaml")])
    assert time.perf_counter() - start < 20  # no Hub retries
    assert missing_data.exit_code == 2 and "data file 'data/mixd.jsonl' does not exist" in missing_data.output
    assert missing_model.exit_code == 2 and "composd' does not exist" in missing_model.output
    assert missing_train_data.exit_code == 2 and "'./data/mixd.jsonl' does not exist" in missing_train_data.output
    assert not (tmp_path / "o").exists()


def test_plain_text_in_a_jsonl_file_names_the_line_and_the_format(tmp_path):
    from moekit import TrainingError
    from moekit.data import load_data

    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "fine"}\nthis line is plain text\n')
    with pytest.raises(TrainingError, match=r"line 2 is not JSON .*\{\"text\": \"...\"\}.*\.txt file"):
        load_data(data)


def test_config_typos_get_a_did_you_mean(tmp_path):
    from moekit import RecipeError, TrainingError, load_recipe
    from moekit.training.config import load_train_config

    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"model": "m", "data": "d.jsonl", "output": "o", "stage": "routers"}))
    with pytest.raises(TrainingError, match=r"stage: .*'routers'.*did you mean 'router'"):
        load_train_config(tmp_path / "t.yaml")
    with pytest.raises(RecipeError, match=r"experts: needs at least 1 item\(s\), got \[\]"):
        load_recipe({"method": "btx", "experts": []})
    with pytest.raises(RecipeError, match=r"method: .*'trad'.*did you mean 'traditional'"):
        load_recipe({"method": "trad", "experts": [{"name": "a", "source": "x"}]})


@pytest.mark.parametrize("checkpointing", [True, False])
def test_full_policy_with_checkpointing_trains_every_weight_and_keeps_its_log(demo, tmp_path, checkpointing):
    """`policy: full` is a full fine-tune on token blocks; `gradient_checkpointing` reaches the router stage (for models
    that need it), gives the same training, and the output keeps the run's log history with its throughput."""
    root, _, files = demo
    config = {"model": str(root / "traditional"), "data": str(files["code"]), "output": str(tmp_path / "out"),
              "max_steps": 4, "block_size": 32, "batch_size": 4, "learning_rate": 1e-3, "policy": "full",
              "gradient_checkpointing": checkpointing}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    seen = {}

    class SeeCheckpointing(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["checkpointing"] = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    from moekit.training import routers

    original = routers.Trainer
    routers.Trainer = lambda *a, callbacks=None, **k: original(*a, callbacks=[SeeCheckpointing()], **k)
    try:
        trained = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml")])
    finally:
        routers.Trainer = original
    assert trained.exit_code == 0, trained.output
    assert seen["checkpointing"] is checkpointing
    before, after = load_file(root / "traditional" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    weights = [name for name in before if not name.endswith(".expert_bias")]  # a buffer `balance: loss` never moves
    assert all(not torch.equal(before[name], after[name]) for name in weights)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert logged
    for entry in logged:  # 4 blocks of 32 tokens a step
        assert entry["throughput/tokens_per_second"] * entry["throughput/seconds_per_step"] == pytest.approx(128, rel=0.01)


@pytest.mark.parametrize("mode", ["data", "hidden"])
def test_router_init_from_the_training_config_sets_the_routers_and_shows_progress(demo, tmp_path, mode):
    """Both ways of setting routers from text are reachable from the YAML; reading every sample through the model
    takes minutes on a real model, so it shows a bar."""
    root, _, files = demo
    names = json.loads((root / "btx" / "config.json").read_text())["expert_names"]
    samples = {name: str(files[name] if name in files else files["code"]) for name in names}
    config = {"model": str(root / "btx"), "data": str(files["code"]), "output": str(tmp_path / "out"), "max_steps": 2,
              "block_size": 32, "batch_size": 4, "router_init": mode, "router_init_data": samples,
              "learning_rate": 1e-12}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    trained = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert trained.exit_code == 0, trained.output
    assert all(f"router init: {name}" in trained.output for name in names), trained.output[-2000:]
    assert ("fitting routers" in trained.output) == (mode == "data")
    before, after = load_file(root / "btx" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    routers = [name for name in before if name.endswith("router.weight")]
    assert routers and all((after[name] - before[name]).abs().max() > 1e-3 for name in routers)  # set, not trained


def test_compile_true_trains_the_same_routers_and_saves_the_same_names(demo, tmp_path, monkeypatch):
    """Regional compilation (each decoder block compiled in place) changes how blocks run, not what they learn or
    what is saved. aot_eager: the same graphs as inductor's, without a C++ compiler on the test machine."""
    from moekit.training import compilation

    monkeypatch.setattr(compilation, "BACKEND", "aot_eager")
    root, _, files = demo
    runner, trained = CliRunner(), {}
    for compiled in (False, True):
        output = tmp_path / f"trained-{compiled}"
        config = {"model": str(root / "btx"), "data": str(files["code"]), "output": str(output), "max_steps": 3,
                  "block_size": 32, "batch_size": 4, "learning_rate": 0.05, "compile": compiled}
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
        result = runner.invoke(app, ["train", str(tmp_path / "train.yaml")])
        assert result.exit_code == 0, result.output
        trained[compiled] = {}
        for path in output.glob("*.safetensors"):
            trained[compiled].update(load_file(path))
    assert trained[True].keys() == trained[False].keys()
    routers = [name for name in trained[False] if name.endswith("router.weight")]
    assert routers
    before = load_file(root / "btx" / "model.safetensors")
    for name in routers:
        assert not torch.equal(trained[True][name], before[name])  # the compiled run trained them
        torch.testing.assert_close(trained[True][name], trained[False][name], atol=1e-5, rtol=1e-4)


def test_compile_is_refused_for_the_trl_stages_naming_the_router_stage(demo, tmp_path):
    root, _, files = demo
    config = {"model": str(root / "btx"), "data": str(files["code"]), "output": str(tmp_path / "out"),
              "stage": "sft", "compile": True}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert result.exit_code != 0 and "compile: true is for stage: router" in result.output
    assert not (tmp_path / "out").exists()
