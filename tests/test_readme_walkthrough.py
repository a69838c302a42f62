"""The README's walk-through (branch → compose → train → eval → report → export) runs as written.

The blocks between `<!-- walkthrough -->` and `<!-- /walkthrough -->` are taken from README.md: the Python block that
names a script in its first comment is saved under that name, and the bash blocks run in order in one shell, in a
fresh folder holding only `data/`, with `SEED` set to a tiny seed (the demo's) and the package's commands on PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def walkthrough_blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    start, end = text.index("<!-- walkthrough -->"), text.index("<!-- /walkthrough -->")
    return FENCE.findall(text[start:end])


def test_the_walkthrough_has_every_step():
    bash = "\n".join(code for language, code in walkthrough_blocks() if language == "bash")
    for command in ("python branch.py", "moekit compose", "moekit train", "moekit eval",
                    "moekit report", "moekit export"):
        assert command in bash, command


def test_the_readme_walkthrough_runs_as_written(demo, tmp_path):
    root, _, files = demo
    (tmp_path / "data").mkdir()
    for name in ("code", "prose"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(files[name].read_text())
    script = []
    for language, code in walkthrough_blocks():
        if language == "python":
            name = re.match(r"# (\S+\.py)", code).group(1)
            (tmp_path / name).write_text(code)
        else:
            script.append(code)
    environment = {**os.environ, "SEED": str(root / "seed"), "CUDA_VISIBLE_DEVICES": "",
                   "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"code", "prose"} and all(entry["perplexity"] > 1 for entry in report.values())
    assert (tmp_path / "report.html").stat().st_size > 1000
    exported = json.loads((tmp_path / "composed-mixtral" / "config.json").read_text())
    assert exported["architectures"] == ["MixtralForCausalLM"] and exported["num_local_experts"] == 3


def test_the_readme_training_config_is_valid():
    """The README's sft/dpo config example is a valid `moekit train` config (no misspelled or removed key)."""
    import yaml

    from moekit.training.config import TrainConfig

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    example = next(block for block in blocks if "stage: sft" in block)
    config = TrainConfig.model_validate(yaml.safe_load(re.sub(r"^ {2}", "", example, flags=re.M)))
    assert config.stage == "sft" and config.lora and config.checkpointing
