"""`moekit benchmark`: lm-evaluation-harness accuracy for a composition, its experts and its base in one table, checked
against the same accuracy computed here from each model's own log-likelihoods (an independent reference)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.benchmarking import BenchmarkError, benchmark
from moekit.cli import app

TASK = "moekit_sums"


def _task(folder, count: int = 12):
    """A local multiple-choice task: 'a + b =' with the right sum among three choices."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices = [str(a + b), str(a + b + rng.randint(1, 9)), str(abs(a - b))]
        rng.shuffle(choices)
        rows.append({"question": f"{a} + {b} =", "choices": choices, "answer": choices.index(str(a + b))})
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": " ",
        "metric_list": [{"metric": "acc"}]}))
    return rows


def _accuracy(path, rows) -> float:
    """Pick the choice of highest summed log-probability, as lm-eval's `acc` does: the continuation is ' ' + choice,
    tokenised as the tail of the whole text after the context's tokens."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    right = 0
    for row in rows:
        context = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context):]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
            positions = range(len(whole) - len(continuation) - 1, len(whole) - 1)
            scores.append(sum(logits[p, t].item() for p, t in zip(positions, continuation)))
        right += int(max(range(len(scores)), key=lambda i: (scores[i], -i)) == row["answer"])
    return right / len(rows)


@pytest.mark.slow
def test_benchmark_scores_the_composition_its_experts_and_agrees_with_the_loglikelihoods(demo, tmp_path):
    root, _, _ = demo
    rows = _task(tmp_path)
    table = benchmark(root / "btx", [TASK], include_path=tmp_path, device="cpu", progress=False)
    names = [(r.name, r.role) for r in table.rows]
    recipe = yaml.safe_load((root / "btx" / "mixturekit_recipe.yaml").read_text())
    assert names == [("btx", "composition"), *[(e["name"], "expert") for e in recipe["experts"]]]
    for row in table.rows:
        assert row.metrics[TASK] == "acc"
        assert row.scores[TASK] == pytest.approx(_accuracy(row.path, rows), abs=1e-9), row.name
    best = table.best(TASK)
    assert f"**{max(r.scores[TASK] for r in table.rows):.4f}**" in table.markdown()
    assert best == max(table.rows, key=lambda r: r.scores[TASK]).name


def test_cli_benchmark_writes_markdown_and_json(demo, tmp_path):
    root, _, _ = demo
    _task(tmp_path, count=4)
    result = CliRunner().invoke(app, ["benchmark", str(root / "traditional"), "--tasks", TASK, "--include-path",
                                      str(tmp_path), "--no-experts", "--limit", "2", "--device", "cpu",
                                      "-o", str(tmp_path / "b.md"), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["role"] for r in data["rows"]] == ["composition"] and data["tasks"] == [TASK]
    assert 0.0 <= data["rows"][0]["scores"][TASK] <= 1.0 and data["markdown"] in (tmp_path / "b.md").read_text()


def test_benchmark_refuses_no_task_and_a_dense_checkpoint(demo, tmp_path):
    root, _, _ = demo
    with pytest.raises(BenchmarkError, match="at least one"):
        benchmark(root / "btx", [])
    recipe = yaml.safe_load((root / "btx" / "mixturekit_recipe.yaml").read_text())
    result = CliRunner().invoke(app, ["benchmark", recipe["experts"][0]["source"], "--tasks", TASK])
    assert result.exit_code == 2 and "not a composed one" in result.output
