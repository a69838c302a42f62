"""The composer's fast paths write exactly what the plain ones do.

`compose` hands the shard writer byte ranges of the source files for copied and stacked tensors (copied by the kernel,
`copy_file_range`) and averages shared tensors block by block through reused buffers. Both must give the bytes that
reading whole tensors and averaging them gives, for mixed source dtypes, for tensors that are not a whole number of
blocks, and where `copy_file_range` is missing or refused. (LoRA-adapted tensors are computed on read and take
the plain path; tests/test_lora_experts.py checks their values.)
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from moekit import build_plan, compose
from moekit.compose import composer, materialize_parts
from moekit.sources import CheckpointReader, ShardWriter, TensorSlot
from moekit.sources.safetensors_io import FileSlice
from tiny_models import make_model, save_model, tiny_config


@pytest.fixture(scope="module")
def mixed_sources(tmp_path_factory):
    """Three Llama experts: bfloat16, float32, bfloat16 (so averaging mixes dtypes and one expert is converted)."""
    root = tmp_path_factory.mktemp("streaming")
    folders = []
    for seed, dtype in [(0, torch.bfloat16), (1, torch.float32), (2, torch.bfloat16)]:
        model = make_model(tiny_config("llama"), seed=seed).to(dtype)
        folders.append(save_model(model, root / f"e{seed}"))
    return folders


def _recipe(folders, method="traditional", **extra):
    return {"method": method, "num_experts_per_tok": 2, "dtype": "bfloat16",
            "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)], **extra}


def _as_bytes(part) -> bytes:
    if isinstance(part, FileSlice):
        with open(part.file, "rb") as handle:
            handle.seek(part.start)
            return handle.read(part.nbytes)
    return part.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_streamed_parts_are_the_plain_parts(mixed_sources, method, monkeypatch):
    monkeypatch.setattr(composer, "AVERAGE_BLOCK", 1000)  # 96 x 32 = 3072 elements: three whole blocks and a rest
    recipe = _recipe(mixed_sources, method, **({"router_layers": ["mlp.gate_proj", "mlp.down_proj"]}
                                               if method == "btx" else {}))
    plan = build_plan(recipe)
    kinds = set()
    for tensor in plan.tensors:
        # each streamed part is read (copied) before the next is asked for: blocks reuse one buffer
        streamed = b"".join(_as_bytes(part) for part in materialize_parts(plan, tensor, streaming=True))
        plain = b"".join(_as_bytes(part) for part in materialize_parts(plan, tensor))
        assert streamed == plain, tensor.name
        kinds.update(type(p).__name__ for p in materialize_parts(plan, tensor, streaming=True))
    assert kinds == {"FileSlice", "Tensor"}


def test_compose_without_copy_file_range_gives_the_same_checkpoint(mixed_sources, tmp_path, monkeypatch):
    fast = compose(_recipe(mixed_sources), output=tmp_path / "fast", progress=False)

    def refused(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    refused_out = compose(_recipe(mixed_sources), output=tmp_path / "refused", progress=False)
    monkeypatch.delattr(os, "copy_file_range")
    missing = compose(_recipe(mixed_sources), output=tmp_path / "missing", progress=False)
    reference = (fast / "model.safetensors").read_bytes()
    assert (refused_out / "model.safetensors").read_bytes() == reference
    assert (missing / "model.safetensors").read_bytes() == reference


def test_writer_copies_file_slices_between_tensors(tmp_path):
    source = tmp_path / "source.bin"
    payload = torch.arange(40, dtype=torch.float32)
    source.write_bytes(b"junk" + payload.numpy().tobytes())
    path = tmp_path / "x.safetensors"
    slots = [TensorSlot("a", torch.float32, (2, 10)), TensorSlot("b", torch.float32, (3,))]
    writer = ShardWriter(path, slots)
    writer.write_parts("a", [FileSlice(source, 4, 40, torch.float32), torch.arange(10, 20, dtype=torch.float32),
                             FileSlice(source, 4 + 4 * 30, 0, torch.float32)])
    writer.write_parts("b", [torch.tensor([7.0, 8.0, 9.0])])
    writer.close()
    reader = CheckpointReader([path])
    assert torch.equal(reader.get("a").reshape(-1), torch.arange(20, dtype=torch.float32))
    assert torch.equal(reader.get("b"), torch.tensor([7.0, 8.0, 9.0]))
    with pytest.raises(RuntimeError, match="as torch.float32"):
        ShardWriter(tmp_path / "y.safetensors", slots).write_parts("a", [FileSlice(source, 4, 80, torch.bfloat16)])
