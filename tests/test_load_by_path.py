"""Tools that take only a path load a composed checkpoint: `trust_remote_code=True` runs the two loader files,
which import the installed moekit. Each check runs in a fresh process that never imports moekit itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from moekit import compose
from moekit.distribution import install_instruction
from moekit.runtime.assembly.loader_files import AUTO_MAP, LOADER_FILES
from tiny_models import VOCAB, make_model, save_model, tiny_config

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env or OFFLINE, timeout=600)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("by-path")
    return root, [save_model(make_model(tiny_config("llama"), seed), root / f"m{seed}") for seed in range(2)]


def _recipe(sources, **extra):
    return {"method": "btx", "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)], **extra}


def test_trust_remote_code_loads_through_the_installed_package_and_resaves_the_same(sources, tmp_path):
    root, folders = sources
    out = compose(_recipe(folders), root / "composed", progress=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert {name: (out / name).read_text() for name in LOADER_FILES} == LOADER_FILES
    tokens = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=tokens).logits
    torch.save(tokens, tmp_path / "tokens.pt")
    done = _run("""
        import sys, torch
        from transformers import AutoModelForCausalLM
        path, work = sys.argv[1], sys.argv[2]
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        assert "moekit" in sys.modules and type(model).__module__.startswith("moekit.")
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(work + "/tokens.pt")).logits, work + "/logits.pt")
        model.save_pretrained(work + "/resaved")
    """, str(out), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=0, rtol=0)
    resaved = tmp_path / "resaved"
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == AUTO_MAP  # not our internal modules
    assert {p.name for p in resaved.glob("*.py")} == set(LOADER_FILES)


def test_without_moekit_the_error_says_how_to_install_it(sources):
    root, folders = sources
    out = compose(_recipe(folders), root / "composed-missing", progress=False, overwrite=True)
    done = _run("""
        import importlib.abc, sys
        class NoMixtureKit(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "moekit":
                    raise ModuleNotFoundError("No module named 'moekit'", name="moekit")
        sys.meta_path.insert(0, NoMixtureKit())
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    """, str(out))
    assert done.returncode != 0 and install_instruction() in done.stderr, done.stderr[-2000:]
    assert "a different project that cannot load it" not in done.stderr  # the other project is not installed here


def test_the_recipe_can_leave_the_loader_files_out(sources):
    root, folders = sources
    out = compose(_recipe(folders, auto_map=False), root / "no-auto-map", progress=False, overwrite=True)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.py"))
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # after `import moekit`, as always


def test_pipeline_generates_from_a_path_in_a_fresh_process(demo):
    root, _, _ = demo
    done = _run("""
        import sys
        from transformers import pipeline
        generator = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True, device="cpu")
        out = generator("def add(a, b):", max_new_tokens=5, do_sample=False)
        assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("def add(a, b):")
        print("ok")
    """, str(root / "btx"))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def _lm_eval_word_perplexity(model_args: str, data: Path, tmp_path: Path) -> float:
    """lm_eval's CLI (`--model hf`) on a local rolling-loglikelihood task over `data`, in a fresh process."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "mixturekit_code.yaml").write_text(yaml.safe_dump({
        "task": "mixturekit_code", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}],
    }))
    executable = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    output = tmp_path / f"results-{abs(hash(model_args))}"
    done = subprocess.run(
        [executable, "--model", "hf", "--model_args", model_args, "--tasks", "mixturekit_code", "--include_path",
         str(task_dir), "--device", "cpu", "--limit", "4", "--batch_size", "1", "--output_path", str(output)],
        capture_output=True, text=True, env=OFFLINE, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    results = [json.loads(p.read_text()) for p in output.rglob("results*.json")]
    return results[0]["results"]["mixturekit_code"]["word_perplexity,none"]


def test_lm_eval_cli_evaluates_a_composed_checkpoint_and_its_export_alike(demo, tmp_path):
    """The composed checkpoint by path (trust_remote_code) and its Mixtral export (plain transformers) give lm_eval
    the same perplexity; the export also generates through `pipeline` without moekit."""
    from moekit import export

    root, _, files = demo
    composed = _lm_eval_word_perplexity(f"pretrained={root / 'traditional'},trust_remote_code=True", files["code"],
                                        tmp_path)
    exported = export(root / "traditional", "mixtral", tmp_path / "mixtral")
    native = _lm_eval_word_perplexity(f"pretrained={exported}", files["code"], tmp_path)
    assert 1.0 < composed < float("inf") and native == pytest.approx(composed, rel=1e-4)
    done = _run("""
        import sys
        from transformers import pipeline
        assert "moekit" not in sys.modules
        out = pipeline("text-generation", model=sys.argv[1], device="cpu")("def add(a, b):", max_new_tokens=5,
                                                                           do_sample=False)
        assert out[0]["generated_text"].startswith("def add(a, b):") and "moekit" not in sys.modules
        print("ok")
    """, str(exported))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
