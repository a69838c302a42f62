import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import mixturekit  # noqa: E402,F401  (registers the architecture)

torch.set_num_threads(2)


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
