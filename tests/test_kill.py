"""Atomicity under SIGKILL: a compose killed while it writes its shards leaves nothing loadable at the output path
(and an existing checkpoint untouched), and composing again afterwards succeeds, byte for byte as if nothing had
happened.

The composes run in a worker subprocess that imports moekit once and forks one child per compose, so each kill
hits a real, separate process mid-write without paying the import time five times. The experts are random Llamas
of ~40 MB each; the composed checkpoint is ~65 MB in 16 MB shards, so writing takes long enough to be caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moekit import OutputError, compose
from moekit.sources import JOURNAL_PREFIX, RETIRED_PREFIX, STAGING_PREFIX

REPO = Path(__file__).resolve().parent.parent
PASSES = 5

WORKER = r"""
import json, os, sys, traceback
import moekit  # once; every compose runs in a fork of this process
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            import torch
            torch.set_num_threads(1)
            if job.get("kill_at"):  # SIGKILL this compose at a named step of the overwrite's swap
                import signal
                from moekit.sources import checkpoint_folder
                checkpoint_folder._reached = (
                    lambda step: step == job["kill_at"] and os.kill(os.getpid(), signal.SIGKILL))
            moekit.compose(job["recipe"], job["output"], overwrite=job["overwrite"], progress=False)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    signalled = os.WIFSIGNALED(status)
    print(json.dumps({"signal": os.WTERMSIG(status) if signalled else None,
                      "code": None if signalled else os.WEXITSTATUS(status)}), flush=True)
"""


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("kill-experts")
    config = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=256, intermediate_size=1024,
                                  num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    folders = []
    for seed in range(2):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / f"expert{seed}")
        folders.append(root / f"expert{seed}")
    return folders


class Worker:
    """The subprocess that forks one compose per job; `start` returns the compose's pid, `wait` how it ended."""

    def __init__(self, log: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(log, "w"), text=True, cwd=REPO, env=env)

    def _reply(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"the compose worker died: {self.log.read_text()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def start(self, recipe: dict, output: Path, overwrite: bool = False, kill_at: str | None = None) -> int:
        job = {"recipe": recipe, "output": str(output), "overwrite": overwrite, "kill_at": kill_at}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._reply()["pid"]

    def wait(self) -> dict:
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    handle = Worker(tmp_path_factory.mktemp("kill-worker") / "worker.log")
    yield handle
    handle.close()


def _recipe(experts: list[Path], **extra) -> dict:
    return {"method": "traditional", "shard_size": "16MB",
            "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(experts)], **extra}


def _tensor_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _staging_folders(parent: Path) -> set[Path]:
    return {p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)}


def _kill_mid_write(worker: Worker, recipe: dict, output: Path, overwrite: bool = False, shards: int = 1) -> Path:
    """Start a compose, SIGKILL it as soon as its staging folder holds `shards` shard files, the last one begun;
    return that folder."""
    before = _staging_folders(output.parent)
    pid = worker.start(recipe, output, overwrite)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for staging in _staging_folders(output.parent) - before:
            written = sorted(staging.glob("*.safetensors"))
            if len(written) >= shards and written[-1].stat().st_size > 0:
                os.kill(pid, signal.SIGKILL)
                ended = worker.wait()
                assert ended["signal"] == signal.SIGKILL, (
                    f"the compose finished before it could be killed ({ended}); make the model bigger")
                return staging
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    worker.wait()
    pytest.fail(f"no staging folder with a shard appeared within 60 s: {worker.log.read_text()[-3000:]}")


def _assert_nothing_loadable(output: Path, staging: Path) -> None:
    assert not output.exists(), f"a killed compose left {sorted(os.listdir(output))} at the output path"
    with pytest.raises((OSError, ValueError)):  # transformers: no such folder / no config.json in it
        AutoModelForCausalLM.from_pretrained(output)
    # The partial folder is hidden, named as staging, and holds no config: no loader picks it up either.
    assert staging.name.startswith(".") and not (staging / "config.json").exists()
    with pytest.raises((OSError, ValueError)):  # transformers: no such folder / no config.json in it
        AutoModelForCausalLM.from_pretrained(staging)


def _assert_loads(output: Path, reference: dict[str, str]) -> None:
    assert _tensor_hashes(output) == reference  # byte-identical to a compose that was never interrupted
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.isfinite().all()


def test_sigkill_mid_write_five_passes_in_a_row(experts, worker, tmp_path):
    recipe = _recipe(experts)
    reference = _tensor_hashes(compose(recipe, tmp_path / "reference", progress=False))
    assert len(reference) >= 4  # several shards, so the kills land at several points
    parent = tmp_path / "outputs"
    parent.mkdir()
    output = parent / "composed"
    for attempt in range(PASSES):  # each pass kills at another point: in shard 1, 2, 3, 4, then 1 again
        staging = _kill_mid_write(worker, recipe, output, shards=attempt % (len(reference) - 1) + 1)
        _assert_nothing_loadable(output, staging)
        assert _staging_folders(parent) == {staging}  # the killed compose's partial folder, nothing else
        assert [p.name for p in parent.iterdir() if not p.name.startswith(STAGING_PREFIX)] == []

        # Composing again works, gives the uninterrupted bytes, and removes the abandoned partial folder (its
        # process is gone) as well as its own.
        assert compose(recipe, output, progress=False) == output
        _assert_loads(output, reference)
        assert _staging_folders(parent) == set(), "a partial folder was left behind"
        shutil.rmtree(output)  # the next pass composes into a fresh path again


def test_sigkill_during_overwrite_keeps_the_existing_checkpoint(experts, worker, tmp_path):
    output = tmp_path / "composed"
    original = _tensor_hashes(compose(_recipe(experts), output, progress=False))
    config_before = (output / "config.json").read_bytes()
    staging = _kill_mid_write(worker, _recipe(experts, seed=7), output, overwrite=True)
    assert staging.parent == output.parent and staging != output
    _assert_loads(output, original)  # the old checkpoint, whole and unchanged
    assert (output / "config.json").read_bytes() == config_before
    # Overwriting afterwards works and replaces it.
    compose(_recipe(experts, seed=7), output, overwrite=True, progress=False)
    assert _tensor_hashes(output) != original
    assert not (_staging_folders(tmp_path) - {staging}), "the successful overwrite left a staging folder"


SWAP_STEPS = ["journal written", "old set aside", "new in place", "old removed"]


@pytest.fixture(scope="module")
def small_experts(tmp_path_factory) -> list[Path]:
    from tiny_models import make_model, save_model, tiny_config

    root = tmp_path_factory.mktemp("swap-experts")
    return [save_model(make_model(tiny_config("llama"), seed), root / f"expert{seed}") for seed in range(2)]


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("step", SWAP_STEPS)
def test_sigkill_at_each_step_of_an_overwrite_leaves_a_checkpoint_or_a_journal_the_next_run_finishes(
        small_experts, worker, tmp_path, step, caplog):
    """Killed after each step of the swap: the old or the new checkpoint is whole at the output, or (between the two
    renames) the journal names where both are; the next write to that output finishes the swap, says so, and
    leaves no hidden folder behind."""
    parent = tmp_path / "outputs"
    output = parent / "composed"
    old = _tensor_hashes(compose(_recipe(small_experts), output, progress=False))
    new = _tensor_hashes(compose(_recipe(small_experts, seed=7), tmp_path / "new-reference", progress=False))
    assert old != new
    pid = worker.start(_recipe(small_experts, seed=7), output, overwrite=True, kill_at=step)
    ended = worker.wait()
    assert ended["signal"] == signal.SIGKILL, (step, ended, worker.log.read_text()[-3000:])
    journal = parent / f"{JOURNAL_PREFIX}composed.json"
    if step == "old set aside":  # the one instant the output path is empty: the journal says where both are
        assert not output.exists()
        record = json.loads(journal.read_text())
        assert record["pid"] == pid and record["old"].startswith(RETIRED_PREFIX)
        _assert_loads(parent / record["old"], old)
        _assert_loads(parent / record["new"], new)
    else:
        _assert_loads(output, old if step == "journal written" else new)
    assert journal.exists()  # each step before the last leaves the journal for the next run

    caplog.set_level("WARNING", logger="moekit.sources.checkpoint_folder")
    with pytest.raises(OutputError, match="already exists"):  # the next write to the output, without --overwrite
        compose(_recipe(small_experts), output, progress=False)
    assert f"an overwrite of '{output}' was interrupted (process {pid} was killed) and is now finished" in caplog.text
    _assert_loads(output, new)
    assert _hidden(parent) == [], "the repair left a hidden folder or the journal"


def test_a_foreign_folder_is_refused_by_overwrite_naming_what_it_holds(small_experts, tmp_path):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "notes.txt").write_text("a user's notes")
    (output / "drafts").mkdir()
    with pytest.raises(OutputError, match=r"holds drafts/, notes.txt, which moekit did not write"):
        compose(_recipe(small_experts), output, overwrite=True, progress=False)
    assert sorted(p.name for p in output.iterdir()) == ["drafts", "notes.txt"]
    assert (output / "notes.txt").read_text() == "a user's notes" and _hidden(tmp_path) == []
    # a dense checkpoint that moekit did not write (a user's model) is refused too
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(small_experts[0]).save_pretrained(plain)
    with pytest.raises(OutputError, match="which moekit did not write"):
        compose(_recipe(small_experts), plain, overwrite=True, progress=False)
