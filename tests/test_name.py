"""The project's names: what users install and import is `moekit`, every instruction it writes says so, it loads
beside the registry's `mixturekit` (another project), and checkpoints written under the old import name still load."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import moekit
from moekit.cli import app
from moekit.distribution import (DISTRIBUTION, OTHER_DISTRIBUTION, OTHER_IMPORT_NAME, PUBLISHED_ON_REGISTRY,
                                 install_instruction)
from moekit.runtime.assembly.loader_files import AUTO_MAP, LOADER_FILES
from tiny_models import make_model, save_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_0_1_0"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
OTHER_RELEASE = f"{OTHER_DISTRIBUTION}==1.1.1"


def test_names_agree_with_pyproject_and_cannot_collide_with_the_other_project():
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == moekit.__name__
    # The version has one home, which pyproject.toml reads.
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moekit.distribution.VERSION"}
    assert moekit.distribution.VERSION == moekit.__version__
    assert set(PYPROJECT["project"]["scripts"]) == {DISTRIBUTION}
    # Neither the distribution, the console script nor the import folder equals the other's, case folded (macOS).
    assert DISTRIBUTION.casefold() not in (OTHER_DISTRIBUTION.casefold(), OTHER_IMPORT_NAME.casefold())


def _instructions(text: str) -> list[str]:
    """Every `pip install ...` in a text, up to the end of its code span, quote or line."""
    return [match.strip() for match in re.findall(r"pip install ([^`\n\"]+)", text)]


def _written_texts(tmp_path: Path) -> dict[str, str]:
    """Everything the package prints or writes that could tell a user how to install it."""
    texts = {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
             for path in sorted((ROOT / "moekit").rglob("*")) if path.suffix in (".py", ".html", ".j2", ".js")}
    texts["README.md"] = (ROOT / "README.md").read_text(encoding="utf-8")
    texts.update({f"docs/{path.name}": path.read_text(encoding="utf-8")
                  for path in sorted((ROOT / "docs").glob("*.md"))})
    sources = [save_model(make_model(tiny_config("llama"), seed), tmp_path / f"m{seed}") for seed in range(2)]
    out = moekit.compose({"method": "btx", "experts": [{"name": f"e{i}", "source": str(s)}
                                                       for i, s in enumerate(sources)]}, tmp_path / "out",
                         progress=False)
    texts.update({f"checkpoint/{p.name}": p.read_text(encoding="utf-8") for p in out.iterdir()
                  if p.suffix in (".py", ".md")})
    texts["moekit --help"] = CliRunner().invoke(app, ["--help"]).output
    return texts


def test_every_install_instruction_names_this_project(tmp_path):
    texts = _written_texts(tmp_path)
    ours = re.compile(rf"^'?{re.escape(DISTRIBUTION)}(\[[\w,]+\])?'?(\s|$)")
    from_clone = re.compile(r"^'?\.(\[[\w,]+\])?'?(\s|$)")
    checked = 0
    for where, text in texts.items():
        for line in text.splitlines():
            for instruction in _instructions(line):
                if re.match(rf"'?{re.escape(OTHER_DISTRIBUTION)}\b", instruction):
                    # Only ever named to warn that it installs another project.
                    assert "another project" in line or "different project" in line, (where, line)
                elif ours.match(instruction):
                    assert PUBLISHED_ON_REGISTRY or "once" in line.lower() or "not on the package registry" in line, (
                        f"{where}: `pip install {instruction}` names the registry, where {DISTRIBUTION} is not yet: "
                        f"{line}")
                    checked += 1
                elif from_clone.match(instruction):
                    assert "repository" in line or "clone" in line, (where, line)
                    checked += 1
    assert checked >= 3  # the loader files (two), the model card
    for name in LOADER_FILES:
        assert install_instruction() in texts[f"checkpoint/{name}"]
    assert install_instruction() in texts["checkpoint/README.md"]


def test_the_checks_would_see_a_wrong_instruction():
    """The classifier above fails on the old instruction, which sent users to the other project."""
    line = "raise ImportError('composed by MixtureKit: `pip install mixturekit` to load it')"
    [instruction] = _instructions(line)
    assert re.match(rf"'?{re.escape(OTHER_DISTRIBUTION)}\b", instruction)
    assert "another project" not in line and "different project" not in line


# -- checkpoints written by 0.1.0, whose import name was `mixturekit` ---------------------------------------------

@pytest.mark.parametrize("method", ["traditional", "btx", "bts"])
def test_checkpoints_written_under_the_old_name_load_and_give_the_same_logits(method):
    expected = load_file(FIXTURES / "expected_logits.safetensors")
    config = json.loads((FIXTURES / method / "config.json").read_text())
    assert config["model_type"] == "mixturekit" and config["auto_map"] == AUTO_MAP  # the format did not change
    for model in (moekit.load(FIXTURES / method, device="cpu", dtype=torch.float32),
                  AutoModelForCausalLM.from_pretrained(FIXTURES / method).eval()):
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected[f"{method}.logits"], atol=1e-6, rtol=0)


def _run(python: str | Path, code: str, *args: str, cwd: Path, env: dict | None = None):
    return subprocess.run([str(python), "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=cwd, env=env or OFFLINE, timeout=600)


LOAD_AND_GENERATE = """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    import moekit
    print("moekit from", moekit.__file__)
    tokens = model.generate(torch.tensor([[5, 9, 3, 17]]), max_new_tokens=6, do_sample=False)
    print("tokens", tokens[0].tolist())
"""


def test_upgrade_makes_an_old_checkpoint_load_by_path_again(tmp_path):
    old = shutil.copytree(FIXTURES / "btx", tmp_path / "btx")
    before = _run(sys.executable, LOAD_AND_GENERATE, str(old), cwd=tmp_path)
    assert before.returncode != 0 and "mixturekit" in before.stderr  # its loader files import the old name
    result = CliRunner().invoke(app, ["upgrade", str(old)])
    assert result.exit_code == 0 and "rewrote" in result.output, result.output
    assert {name: (old / name).read_text() for name in LOADER_FILES} == LOADER_FILES
    assert (old / "model.safetensors").read_bytes() == (FIXTURES / "btx" / "model.safetensors").read_bytes()
    after = _run(sys.executable, LOAD_AND_GENERATE, str(old), cwd=tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    assert "already current" in CliRunner().invoke(app, ["upgrade", str(old)]).output


def test_upgrade_refuses_a_dense_checkpoint(tmp_path):
    dense = save_model(make_model(tiny_config("llama"), 0), tmp_path / "dense")
    result = CliRunner().invoke(app, ["upgrade", str(dense)])
    assert result.exit_code == 2 and "dense llama checkpoint" in result.output
    assert not list(dense.glob("*.py"))


# -- a fresh environment, as a user installs it, with and without the other project beside it ----------------------

@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Our wheel, built from this checkout as `pip install .` builds it, and the other project's from the registry."""
    folder = tmp_path_factory.mktemp("wheels")
    for command in ([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder), str(ROOT)],
                    [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder),
                     OTHER_RELEASE]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    [ours] = folder.glob(f"{DISTRIBUTION}-*.whl")
    [other] = folder.glob(f"{OTHER_DISTRIBUTION}-*.whl")
    return ours, other


def _fresh_environment(folder: Path) -> Path:
    """A new virtual environment that sees this environment's dependencies (torch, transformers, ...) but not its
    editable `moekit`: a .pth line adds the site-packages folder as a plain path, whose own .pth files (the editable
    install's) are not processed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    site = next((folder / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python"


def _pip_install(environment: Path, wheel: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", "--prefix",
                           str(environment), str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_a_fresh_environment_loads_by_path_beside_the_other_project(wheels, tmp_path):
    ours, other = wheels
    sources = [save_model(make_model(tiny_config("llama"), seed), tmp_path / f"m{seed}") for seed in range(2)]
    path = moekit.compose({"method": "traditional", "experts": [{"name": f"e{i}", "source": str(s)}
                                                                for i, s in enumerate(sources)]},
                          tmp_path / "composed", progress=False)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path).eval().generate(
            torch.tensor([[5, 9, 3, 17]]), max_new_tokens=6, do_sample=False)[0].tolist()
    environment = tmp_path / "env"
    python = _fresh_environment(environment)
    work = tmp_path / "cwd"  # not the checkout: its moekit/ folder must not be importable from the working directory
    work.mkdir()
    fresh = {k: v for k, v in OFFLINE.items() if k != "PYTHONPATH"}  # nothing of this environment's path leaks in

    missing = _run(python, LOAD_AND_GENERATE, str(path), cwd=work, env=fresh)
    assert missing.returncode != 0 and install_instruction() in missing.stderr, missing.stderr[-2000:]

    _pip_install(environment, other)  # the other project alone: the loader says that it is the wrong one
    wrong = _run(python, LOAD_AND_GENERATE, str(path), cwd=work, env=fresh)
    assert wrong.returncode != 0, wrong.stdout
    assert (f"the `{OTHER_IMPORT_NAME}` package found here is the registry's `{OTHER_DISTRIBUTION}`, a different "
            "project") in wrong.stderr and install_instruction() in wrong.stderr, wrong.stderr[-2000:]

    _pip_install(environment, ours)  # both: ours loads and generates what this process generates
    both = _run(python, LOAD_AND_GENERATE, str(path), cwd=work, env=fresh)
    assert both.returncode == 0, both.stderr[-3000:]
    assert f"moekit from {environment}" in both.stdout and f"tokens {expected}" in both.stdout, both.stdout
    assert (environment / "bin" / DISTRIBUTION).exists() and (environment / "bin" / OTHER_DISTRIBUTION).exists()
    listed = _run(python, "import importlib.metadata as m; print(sorted(d.metadata['Name'].lower() for d in "
                  "m.distributions(path=[__import__('site').getsitepackages()[0]])))", cwd=work, env=fresh)
    assert DISTRIBUTION in listed.stdout and OTHER_DISTRIBUTION in listed.stdout, listed.stdout
