"""Device and dtype choice when the user names none: CUDA, then MPS, then the CPU (probes mocked), and the portable
expert path on devices without grouped_mm."""

from __future__ import annotations

import pytest
import torch

from moekit import devices
from moekit.runtime.compute.experts import resolve_backend


@pytest.fixture
def probes(monkeypatch):
    state = {"cuda": False, "mps": False, "macos14": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["cuda"])
    monkeypatch.setattr(devices, "mps_available", lambda: state["mps"])
    monkeypatch.setattr(devices, "mps_runs_bfloat16", lambda: state["macos14"])
    return state


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(probes, cuda, mps, expected):
    probes.update(cuda=cuda, mps=mps)
    assert devices.default_device() == expected
    assert devices.resolve_device(None) == devices.resolve_device("auto") == expected
    assert devices.resolve_device("cpu") == "cpu"  # a named device is kept, whatever is available


@pytest.mark.parametrize("stored, macos14, expected", [
    (torch.float16, False, torch.float16), (torch.float32, False, torch.float32),
    (torch.bfloat16, True, torch.bfloat16), (torch.bfloat16, False, torch.float32), (None, True, torch.float32)])
def test_mps_dtype_follows_what_macos_runs(probes, stored, macos14, expected):
    probes.update(macos14=macos14)
    assert devices.default_dtype("mps", stored) == expected


def test_cpu_loads_float32_and_cuda_the_stored_dtype():
    assert devices.default_dtype("cpu", torch.bfloat16) == torch.float32
    assert devices.default_dtype("cuda", torch.bfloat16) == "auto"


def test_grouped_mm_is_chosen_only_on_cpu_and_cuda():
    weight = torch.zeros(2, 16, 16)
    inputs = torch.zeros(4, 16)
    assert resolve_backend("auto", inputs, weight) == "grouped_mm"  # CPU float32, aligned
    meta_inputs, meta_weight = inputs.to("meta"), weight.to("meta")  # a device that is neither
    assert resolve_backend("auto", meta_inputs, meta_weight) == "loop"


def test_load_uses_the_device_rule(probes, tmp_path, monkeypatch):
    """`load_for_scoring` with no device asks `default_device` (here: mps, mocked) and the MPS dtype rule; the model
    is moved there (the move is mocked: this machine has no MPS)."""
    import moekit.loading as loading
    from tiny_models import make_model, save_model, tiny_config

    folder = save_model(make_model(tiny_config("llama"), 0).to(torch.float16), tmp_path / "dense")
    probes.update(mps=True)
    moved = {}
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.setdefault("to", a) and self)
    model = loading.load_for_scoring(folder)
    assert moved["to"] == ("mps",)
    assert next(model.parameters()).dtype == torch.float16  # the stored float16 kept on MPS
    assert loading.stored_dtype(folder) == torch.float16
