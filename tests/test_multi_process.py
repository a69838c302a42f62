"""`accelerate launch` with 2 CPU processes (gloo) trains exactly like 1 process with the same global batch.

Both runs go through `moekit train` unchanged. The reference is the single-process run; what must match is the
loss and the routing statistics logged at every step and the trained weights. A rank-local load-balancing loss (each
rank's own f_i, or the aux loss counted once per rank) or statistics from rank 0 alone would all break the equality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from processes import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch was built without distributed")


def launch(config: dict, folder: Path, processes: int) -> list[dict]:
    """Run `moekit train` under `accelerate launch` on CPU; return the trainer's log history."""
    folder.mkdir(parents=True)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({**config, "output": str(folder / "out")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    command += ["--multi_gpu"] if processes > 1 else []
    command += ["-m", "moekit.cli", "train", str(path)]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    if processes > 1:  # each rank would train alone (and log twice) if the trainer missed the process group
        assert "parallel_mode != ParallelMode.DISTRIBUTED" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1, done.stdout  # only the main process reports (and writes)
    states = sorted((folder / "out").rglob("trainer_state.json"))
    assert states, f"no checkpoint under {folder / 'out'}"
    history = json.loads(states[-1].read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def assert_same_history(single: list[dict], multi: list[dict], keys: tuple[str, ...]) -> None:
    assert len(single) == len(multi) and len(single) >= 3, (single, multi)
    for step_single, step_multi in zip(single, multi):
        for key in keys:
            expected = pytest.approx(step_single[key], rel=2e-5, abs=1e-6)
            assert step_multi[key] == expected, (key, step_single, step_multi)


def trained_tensors(folder: Path, filename: str) -> dict[str, torch.Tensor]:
    return load_file(folder / "out" / filename)


@pytest.fixture(scope="module")
def balanced_btx(demo, tmp_path_factory):
    """The demo's btx model with a strong balance term and a z-loss, so that getting them wrong shows."""
    root, _, files = demo
    folder = tmp_path_factory.mktemp("balanced") / "btx"
    shutil.copytree(root / "btx", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(alpha=0.1, router_z_loss_coef=0.01)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, files


def test_router_training_on_two_processes_equals_one_process(balanced_btx, tmp_path):
    folder, files = balanced_btx
    base = {"model": str(folder), "data": str(files["code"]), "max_steps": 5, "block_size": 32,
            "learning_rate": 0.05, "save_steps": 5}
    runs = {
        "1x8": launch({**base, "batch_size": 8}, tmp_path / "1x8", 1),
        "2x4": launch({**base, "batch_size": 4}, tmp_path / "2x4", 2),
        "1x4+ga2": launch({**base, "batch_size": 4, "gradient_accumulation_steps": 2}, tmp_path / "1x4+ga2", 1),
        "2x2+ga2": launch({**base, "batch_size": 2, "gradient_accumulation_steps": 2}, tmp_path / "2x2+ga2", 2),
    }
    keys = ("loss", "grad_norm", "routing/entropy_mean", "routing/max_load_max", "routing/dead_experts")
    assert_same_history(runs["1x8"], runs["2x4"], keys)
    assert_same_history(runs["1x4+ga2"], runs["2x2+ga2"], keys)
    # Gradient accumulation balances each micro-batch (of 4 here), so it is close to, not equal to, one batch of 8.
    assert runs["1x4+ga2"][0]["loss"] == pytest.approx(runs["1x8"][0]["loss"], rel=0.05)

    start = load_file(folder / "model.safetensors")
    for single, multi in (("1x8", "2x4"), ("1x4+ga2", "2x2+ga2")):
        one, two = (trained_tensors(tmp_path / run, "model.safetensors") for run in (single, multi))
        routers = [name for name in start if name.endswith("router.weight")]
        assert routers and all(not torch.equal(one[name], start[name]) for name in routers)
        for name in start:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda message, name=name: f"{name}: {message}")

    # The output written by rank 0 loads on one process and computes what the single-process output computes.
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / run / "out").eval() for run in ("1x8", "2x4")]
    ids = torch.randint(0, models[0].config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(models[1](ids).logits, models[0](ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_sft_on_two_processes_equals_one_process(demo, tmp_path):
    """Texts of different lengths: the ranks see different numbers of tokens, and padding is masked."""
    root, _, files = demo
    texts = [json.loads(line)["text"] for line in files["prose"].read_text().splitlines()]
    rows = [{"text": text[start:start + 60 + 17 * (start // 100 % 5)]}
            for text in texts for start in range(0, min(len(text), 1500), 100)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = {"model": str(root / "btx"), "stage": "sft", "data": str(data), "max_steps": 4, "learning_rate": 0.01,
            "save_steps": 4}
    single = launch({**base, "batch_size": 8}, tmp_path / "1x8", 1)
    multi = launch({**base, "batch_size": 4}, tmp_path / "2x4", 2)
    assert_same_history(single, multi, ("loss", "grad_norm", "aux_loss", "num_tokens", "routing/entropy_mean"))
    one, two = (trained_tensors(tmp_path / run, "adapter_model.safetensors") for run in ("1x8", "2x4"))
    assert any("lora" in name for name in one) and any("router" in name for name in one), sorted(one)
    assert set(two) == set(one)
    # Adam turns float noise in near-zero gradient entries into visible steps, so compare whole tensors: a rank-local
    # balance loss moves them by several percent, reduction order by under 0.1%.
    for name in one:
        difference = (two[name] - one[name]).norm() / one[name].norm()
        assert difference < 1e-3, (name, difference.item())


def test_checkpointing_made_reentrant_by_the_trainer_is_refused_before_training(demo):
    """TRL makes checkpointing reentrant for PEFT under ZeRO-3, which would drop the balance loss's gradient."""
    from types import SimpleNamespace

    from moekit import TrainingError
    from moekit.training.checkpointing import CHECKPOINTING_ARGUMENT
    from moekit.training.trl_adapter import check_checkpointing_keeps_balance_gradient

    root, _, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx")

    def arguments(checkpointing, reentrant):
        return SimpleNamespace(**{CHECKPOINTING_ARGUMENT: checkpointing,
                                  f"{CHECKPOINTING_ARGUMENT}_kwargs": {"use_reentrant": reentrant}})

    with pytest.raises(TrainingError, match="gradient_checkpointing: false"):
        check_checkpointing_keeps_balance_gradient(arguments(True, True), model)
    for checkpointing, reentrant in ((False, True), (True, False)):
        check_checkpointing_keeps_balance_gradient(arguments(checkpointing, reentrant), model)


def test_trl_trainers_check_their_checkpointing_when_built(demo, tmp_path):
    """The check runs inside the composed TRL trainers, after TRL's own `__init__` had its say."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from moekit import TrainingError
    from moekit.training.checkpointing import CHECKPOINTING_ARGUMENT
    from moekit.training.trl_adapter import ComposedSFTTrainer

    root, _, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / "btx")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                     **{CHECKPOINTING_ARGUMENT: True, f"{CHECKPOINTING_ARGUMENT}_kwargs": {"use_reentrant": True}})
    with pytest.raises(TrainingError, match="gradient_checkpointing: false"):
        ComposedSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": "one two three"}] * 2),
                           processing_class=AutoTokenizer.from_pretrained(root / "btx"))


@pytest.mark.parametrize("method", ["btx", "traditional"])
def test_models_print_while_zero3_holds_their_parameters(demo, method):
    """DeepSpeed ZeRO-3 leaves each parameter an empty placeholder between gathers, and PEFT prints every module
    (`repr`) when TRL's DPO disables the adapter for the reference pass: nothing may read a shape from a weight."""
    root, _, _ = demo
    model = AutoModelForCausalLM.from_pretrained(root / method)
    def ours(text: str) -> list[str]:  # transformers' own norms print their weight's shape, which does change
        return [line for line in text.splitlines() if "num_experts=" in line]

    expected = ours(repr(model))
    for parameter in model.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype)
    assert expected and ours(repr(model)) == expected
