"""The README's quick start and the walk-through (docs/walkthrough.md: branch → compose → train → eval → report
→ export) run as written.

The blocks between a page's `<!-- quick start -->` / `<!-- walkthrough -->` marker and its closing one are taken
from the page: a YAML or Python block that names a file in its first comment (`# recipe.yaml`, `# branch.py ...`) is
saved under that name, another Python block is saved and run with `python` where it stands, and the bash blocks run
in order in one shell, in a fresh folder, with the package's commands on PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
TRAINING = ROOT / "docs" / "training.md"
FENCE = re.compile(r"```(python|bash|yaml)\n(.*?)```", re.S)


def marked_blocks(page: Path, marker: str) -> list[tuple[str, str]]:
    """The (language, code) of each fenced block between `<!-- marker -->` and `<!-- /marker -->`."""
    text = page.read_text(encoding="utf-8")
    start, end = text.index(f"<!-- {marker} -->"), text.index(f"<!-- /{marker} -->")
    return FENCE.findall(text[start:end])


def walkthrough_blocks() -> list[tuple[str, str]]:
    return marked_blocks(WALKTHROUGH, "walkthrough")


def run_as_written(blocks: list[tuple[str, str]], folder: Path, environment: dict[str, str]):
    """Save the named files, then run the bash blocks and the unnamed Python blocks in order in one shell."""
    script = []
    for index, (language, code) in enumerate(blocks):
        named = re.match(r"# (\S+\.(?:py|yaml))\b", code)
        if language in ("python", "yaml") and named:
            (folder / named.group(1)).write_text(code)
        elif language == "python":
            (folder / f"block_{index}.py").write_text(code)
            script.append(f"python block_{index}.py")
        elif language == "bash":
            script.append(code)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=folder, capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false", **environment,
                               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])})


def test_the_walkthrough_has_every_step():
    bash = "\n".join(code for language, code in walkthrough_blocks() if language == "bash")
    for command in ("python branch.py", "moekit compose", "moekit train", "moekit eval",
                    "moekit report", "moekit export"):
        assert command in bash, command


def test_the_readme_quick_start_runs_as_written(demo, tmp_path):
    """On the demo's experts, where `make demo` leaves them: the recipe is shown before it is used, and every
    command and the Python block run unchanged."""
    root, _, _ = demo
    (tmp_path / "demo_output").symlink_to(root, target_is_directory=True)
    blocks = marked_blocks(README, "quick start")
    assert [language for language, _ in blocks][0] == "yaml" and blocks[0][1].startswith("# recipe.yaml")
    done = run_as_written(blocks, tmp_path, {})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    config = json.loads((tmp_path / "composed" / "config.json").read_text())
    assert config["model_type"] == "mixturekit" and config["method"] == "btx"
    assert config["expert_names"] == ["code", "prose", "arithmetic"] and config["num_experts_per_tok"] == 2
    plans = [line for line in done.stdout.splitlines() if line.startswith("parameters: total")]
    assert len(plans) == 4 and len(set(plans)) == 1, plans  # inspect (recipe, checkpoint), compose, plan_summary
    assert done.stdout.count("def main():") == 1  # the Python block's generation, prompt included


def test_the_walkthrough_runs_as_written(demo, tmp_path):
    root, _, files = demo
    (tmp_path / "data").mkdir()
    for name in ("code", "prose"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(files[name].read_text())
    done = run_as_written(walkthrough_blocks(), tmp_path, {"SEED": str(root / "seed")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"code", "prose"} and all(entry["perplexity"] > 1 for entry in report.values())
    assert (tmp_path / "report.html").stat().st_size > 1000
    exported = json.loads((tmp_path / "composed-mixtral" / "config.json").read_text())
    assert exported["architectures"] == ["MixtralForCausalLM"] and exported["num_local_experts"] == 3


def test_the_training_guide_config_is_valid():
    """docs/training.md's sft/dpo config example is a valid `moekit train` config (no misspelled or removed key)."""
    import yaml

    from moekit.training.config import TrainConfig

    blocks = re.findall(r"```yaml\n(.*?)```", TRAINING.read_text(encoding="utf-8"), re.S)
    example = next(block for block in blocks if "stage: sft" in block)
    config = TrainConfig.model_validate(yaml.safe_load(re.sub(r"^ {2}", "", example, flags=re.M)))
    assert config.stage == "sft" and config.lora and config.checkpointing
