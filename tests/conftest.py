import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import moekit  # noqa: E402,F401  (registers the architecture)

# Under `make test` two pytest-xdist workers share the machine's cores: one thread each keeps them from fighting.
# Processes the tests start inherit the same count, so that a fresh process computes bit-identical float sums.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_loading_warnings(caplog):
    """Fail if transformers warns about missing, unexpected or re-initialised weights."""
    caplog.set_level(logging.WARNING)
    yield caplog
    bad = [r.getMessage() for r in caplog.records
           if any(w in r.getMessage().lower() for w in ("missing", "unexpected", "newly initialized", "not used"))]
    assert not bad, bad


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The quick demo's composed models (with a real tokenizer) and its domains as JSONL `text` files."""
    from moekit.demo import run_demo
    from moekit.demo.run import _domains

    root = tmp_path_factory.mktemp("demo")
    result = run_demo(root, quick=True, progress=False)
    files = {}
    for name, domain in _domains(True, 0).items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in domain.train))
    return root, result, files
