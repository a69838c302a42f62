"""The streaming shard writer writes files the `safetensors` library reads; the reader catches damaged files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moekit import SourceError
from moekit.sources import CheckpointReader, ShardWriter, TensorSlot


def test_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    writer = ShardWriter(path, [TensorSlot(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write_parts(name, [tensor])
    writer.close()
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    reader = CheckpointReader([path])
    for name, tensor in tensors.items():
        assert torch.equal(reader.get(name), tensor)


def test_writer_refuses_a_tensor_out_of_plan(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors", [TensorSlot("a", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match="expected 8 bytes for a"):
        writer.write_parts("a", [torch.zeros(3)])


def test_truncated_file_is_reported(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SourceError, match="truncated"):
        CheckpointReader([path])
    path.write_bytes(b"\xff" * 4)
    with pytest.raises(SourceError, match="not a safetensors file"):
        CheckpointReader([path])
