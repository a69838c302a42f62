"""Composition's peak memory does not grow with the number of experts (beyond about one output tensor).

Self-contained (bench/compose_memory.py is the fuller benchmark, see docs/performance.md): six distinct random
Llama-shaped float32 models of ~114 MB each are composed 2 and 6 at a time, each composition in a fresh Python
process that reports its own peak RSS from /proc/self/status `VmHWM`. (`ru_maxrss` would be wrong here: on Linux a
child started by subprocess inherits the parent's high-water mark across fork/exec, so every child would report at
least the pytest process's RSS and the comparison would pass trivially.)
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FIELDS = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=8000)  # ~28.6M parameters, ~114 MB in float32
MOST = 6
CHILD = r"""
import json, sys
import torch, moekit
job = json.loads(sys.argv[1])
moekit.compose(job["recipe"], output=job["output"], overwrite=True, progress=False)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak}))
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").is_file() or "VmHWM" not in Path("/proc/self/status").read_text(),
                       reason="needs Linux /proc/self/status VmHWM"),
]


def _make_source(folder: Path, seed: int) -> Path:
    """A HF folder of random weights, drawn tensor by tensor (names and shapes from a meta-device model)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**FIELDS, max_position_embeddings=256, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: (1.0 + 0.1 * torch.randn(shape, generator=generator)) if len(shape) == 1
               else 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("compose_memory_sources")
    return [_make_source(root / f"m{i}", seed=100 + i) for i in range(MOST)]


def _compose_peak_rss(method: str, sources: list[Path], output: Path) -> int:
    recipe = {"method": method, "experts": [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources)],
              "num_experts_per_tok": 2, "shard_size": "200MB"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"recipe": recipe, "output": str(output)})],
                          capture_output=True, text=True, env=env, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss"]


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _read(path: Path, header: dict, data_start: int, name: str, index: int) -> torch.Tensor:
    """One slice `[index]` of a stacked tensor, read with a seek (the checkpoint is never loaded whole)."""
    entry = header[name]
    assert entry["dtype"] == "F32"
    shape = entry["shape"]
    step = 4 * int(torch.tensor(shape[1:]).prod())
    with open(path, "rb") as handle:
        handle.seek(data_start + entry["data_offsets"][0] + index * step)
        data = bytearray(handle.read(step))
    return torch.frombuffer(data, dtype=torch.float32).reshape(shape[1:])


def _check_checkpoint(folder: Path, method: str, sources: list[Path]) -> None:
    """Cheap sanity: the index covers the shards, stacked tensors have one slice per expert, and the last expert's
    slice of layer 0 is that expert's own weights (so the experts are there, in order, and not one repeated)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    headers = {path: _header(path) for path in files}
    names = {name for header, _ in headers.values() for name in header}
    if len(files) > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == names
        assert set(index["weight_map"].values()) == {p.name for p in files}
    config = json.loads((folder / "config.json").read_text())
    count = len(sources)
    assert config["method"] == method and len(config["expert_names"]) == count

    layers = FIELDS["num_hidden_layers"]
    hidden, inter = FIELDS["hidden_size"], FIELDS["intermediate_size"]
    if method == "traditional":
        stacked, shape = "model.layers.0.mlp.experts.gate_up_proj", [count, 2 * inter, hidden]
        dense = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
        assert sum(n.endswith("mlp.experts.gate_up_proj") for n in names) == layers
    else:
        stacked, shape = "model.layers.0.mlp.up_proj.weight", [count, inter, hidden]
        dense = ["model.layers.0.mlp.up_proj.weight"]
    path = next(p for p, (header, _) in headers.items() if stacked in header)
    header, data_start = headers[path]
    assert header[stacked]["shape"] == shape
    last = count - 1
    with safe_open(str(sources[last] / "model.safetensors"), "pt") as source:
        expected = torch.cat([source.get_tensor(name) for name in dense], dim=0)
    assert torch.equal(_read(path, header, data_start, stacked, last), expected)


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_peak_rss_does_not_grow_with_experts(method, sources, tmp_path):
    peaks = {}
    for count in (2, MOST):
        output = tmp_path / f"out-{count}"
        peaks[count] = _compose_peak_rss(method, sources[:count], output)
        _check_checkpoint(output, method, sources[:count])
    model_bytes = (sources[0] / "model.safetensors").stat().st_size
    report = f"{method}: peak RSS {peaks[2] / 1e6:.0f} MB with 2 experts, {peaks[MOST] / 1e6:.0f} MB with {MOST}"
    # Holding every expert at once would add 4 x 114 MB here; streaming adds at most the larger stacked tensors.
    assert peaks[MOST] <= 1.3 * peaks[2], report
    assert peaks[MOST] - peaks[2] < model_bytes, f"{report}: grew by more than one source model ({model_bytes / 1e6:.0f} MB)"
