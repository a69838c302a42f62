"""Read and write safetensors one tensor at a time, without memory-mapping whole files.

The `safetensors` library maps files into memory, and every page touched stays in the process's resident set; to
keep composition memory near one tensor (not the sum of the models) we read each tensor with `pread` and write each
shard's header first and then its tensors one by one. The format is the documented one: 8 bytes little-endian header
length, a JSON header of `{name: {dtype, shape, data_offsets}}` padded with spaces to 8 bytes, then the data.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SourceError
from .conversions import Conversion, ConvertedTensor, checkpoint_names

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20
# What to do about a damaged file, appended to every message that reports one.
_DAMAGED_FIX = "re-download the model, or re-save it with save_pretrained from an intact copy"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, read from the header only."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def dtype_nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one file's header: its tensors and its metadata, checking that offsets fit the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SourceError(
                    f"'{path}' is not a safetensors file: it is shorter than its 8-byte header length; {_DAMAGED_FIX}"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise SourceError(
                    f"'{path}' has a corrupted safetensors header (declared {header_len} bytes in a {size}-byte "
                    f"file); {_DAMAGED_FIX}"
                )
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"'{path}' has a corrupted safetensors header ({error}); {_DAMAGED_FIX}") from None
    except OSError as error:
        raise SourceError(f"cannot read '{path}': {error}") from None
    if not isinstance(header, dict):
        raise SourceError(f"'{path}' has a corrupted safetensors header (not a JSON object); {_DAMAGED_FIX}")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if begin < 0 or any(d < 0 for d in shape):
                raise ValueError("negative offset or dimension")
        except (KeyError, TypeError, ValueError):
            raise SourceError(
                f"'{path}': tensor '{name}' has a malformed header entry {entry!r}; {_DAMAGED_FIX}"
            ) from None
        expected = math.prod(shape) * dtype_nbytes(dtype)
        if end - begin != expected or data_start + end > size:
            raise SourceError(
                f"'{path}' is truncated or corrupted: tensor '{name}' needs bytes {begin}..{end} of the data "
                f"section ({expected} bytes for shape {list(shape)}) but the file has {size - data_start}; "
                f"{_DAMAGED_FIX}"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors, metadata


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint made of one or more safetensors files.

    Tensors are addressed by their stored names until `read_as(model)` addresses them as `model` loads them (renamed
    and converted with transformers' rules): then a converted tensor is a `ConvertedTensor`, computed when read."""

    def __init__(self, files: list[Path]):
        if not files:
            raise SourceError("no safetensors files given")
        self.files = list(files)
        self._headers: dict[str, TensorInfo] = {}  # every stored tensor by its stored name
        for path in self.files:
            tensors, _ = read_header(path)
            for name, info in tensors.items():
                if name in self._headers:
                    raise SourceError(f"tensor '{name}' appears in both '{self._headers[name].file}' and '{path}'")
                self._headers[name] = info
        self.tensors: dict[str, TensorInfo | ConvertedTensor] = dict(self._headers)
        self._converted: tuple[Conversion, dict[str, torch.Tensor]] | None = None  # the last group's unread outputs

    def read_as(self, model: nn.Module) -> None:
        """Address tensors by the names, and in the layout, that `model` (a meta model of this checkpoint's config)
        has: the renamings and conversions transformers applies on load, from the stored tensors (not from an earlier
        call's names)."""
        names = checkpoint_names(model, self._headers, self._read_stored)
        self.tensors = {name: converted or self._headers[stored]
                        for name, (stored, converted) in names.items()}
        self._converted = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo | ConvertedTensor:
        """The tensor's name, dtype and shape (and, when stored as it is read, where it lies), without reading it."""
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (no mapping of the file); a converted one is computed from its stored
        tensors by transformers' rule, whose other outputs are kept until they are read (or another group is)."""
        info = self.tensors[name]
        if isinstance(info, TensorInfo):
            return self._read(info)
        cached = self._converted
        if cached is None or cached[0] is not info.conversion or name not in cached[1]:
            self._converted = cached = (info.conversion, info.conversion.run(self._read_stored))
        tensor = cached[1].pop(name)
        if not cached[1]:
            self._converted = None
        return tensor

    def stored(self, name: str) -> TensorInfo | None:
        """Where the bytes that `get(name)` returns lie in a file, as they are: so a caller may copy or read them in
        blocks itself. None when `get` computes the tensor instead (a converted tensor, or a subclass that changes it
        on read)."""
        info = self.tensors[name]
        return info if isinstance(info, TensorInfo) else None

    def _read_stored(self, stored_name: str) -> torch.Tensor:
        return self._read(self._headers[stored_name])

    @staticmethod
    def _read(info: TensorInfo) -> torch.Tensor:
        """Read one stored tensor into fresh memory, uninitialised before the read fills it."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as handle:
            read_exactly(handle.fileno(), memoryview(raw.numpy()), info.start, info)
        return raw.view(info.dtype).reshape(info.shape)


def read_exactly(fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
    """Fill `view` from `fd` at `offset` (part of the tensor `info`); a short file is a damaged one."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise SourceError(f"'{info.file}' ended while reading tensor '{info.name}'; {_DAMAGED_FIX}")
        done += got


@dataclass(frozen=True)
class FileSlice:
    """A part of a tensor to write that is a byte range of an existing file, copied as it is (`ShardWriter` lets
    the kernel copy it: no buffer in this process)."""

    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype


@dataclass(frozen=True)
class TensorSlot:
    """A tensor to be written: its name, dtype and shape are known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_nbytes(self.dtype)


class ShardWriter:
    """Writes one safetensors file whose header is known up front, then its tensors in order, one at a time."""

    def __init__(self, path: Path, slots: list[TensorSlot], metadata: dict[str, str] | None = None):
        self.path = path
        self.slots = slots
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        offset = 0
        for slot in slots:
            header[slot.name] = {
                "dtype": DTYPE_CODES[slot.dtype], "shape": list(slot.shape), "data_offsets": [offset, offset + slot.nbytes]
            }
            offset += slot.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        # unbuffered: tensors are written in large parts, and a `FileSlice` is copied by the kernel into the same file
        self._handle = open(path, "wb", buffering=0)
        self._copy_range = hasattr(os, "copy_file_range")
        self._buffer: memoryview | None = None  # for copying a FileSlice where copy_file_range cannot
        _write_all(self._handle, memoryview(struct.pack("<Q", len(encoded)) + encoded))

    def write_parts(self, name: str, parts) -> None:
        """Write the next tensor as consecutive parts (e.g. one expert's slice of a stacked tensor at a time), so
        the whole tensor never has to be in memory."""
        slot = self.slots[self._next]
        if name != slot.name:
            raise RuntimeError(f"shard writer expected {slot.name} next, got {name}")
        written = 0
        for part in parts:
            if part.dtype != slot.dtype:
                raise RuntimeError(f"shard writer expected {slot.name} as {slot.dtype}, got {part.dtype}")
            if isinstance(part, FileSlice):
                self._copy_slice(part)
                written += part.nbytes
                continue
            data = part.detach().contiguous().cpu().reshape(-1)
            if data.numel():
                _write_all(self._handle, memoryview(data.view(torch.uint8).numpy()))
            written += data.numel() * data.element_size()
        if written != slot.nbytes:
            raise RuntimeError(f"shard writer expected {slot.nbytes} bytes for {slot.name}, got {written}")
        self._next += 1

    def _copy_slice(self, part: FileSlice) -> None:
        """Append `part`'s bytes: `copy_file_range` (the kernel copies page cache to page cache, or shares extents),
        else a read/write loop through one reused buffer."""
        with open(part.file, "rb", buffering=0) as source:
            done = 0
            if self._copy_range:
                try:
                    while done < part.nbytes:
                        got = os.copy_file_range(source.fileno(), self._handle.fileno(), part.nbytes - done,
                                                 part.start + done)
                        if got <= 0:
                            break
                        done += got
                except OSError as error:
                    if error.errno not in _NO_COPY_RANGE:
                        raise
                    self._copy_range = False  # e.g. another file system, or a kernel without it: copy ourselves
            if done < part.nbytes:
                if self._buffer is None:
                    self._buffer = memoryview(bytearray(_COPY_BUFFER_BYTES))
                info = TensorInfo(f"bytes {part.start}..{part.start + part.nbytes}", part.file, part.dtype, (),
                                  part.start, part.nbytes)
                while done < part.nbytes:
                    view = self._buffer[:min(len(self._buffer), part.nbytes - done)]
                    read_exactly(source.fileno(), view, part.start + done, info)
                    _write_all(self._handle, view)
                    done += len(view)

    def close(self) -> None:
        if self._next != len(self.slots):
            self._handle.close()
            raise RuntimeError(f"shard {self.path.name} closed after {self._next} of {len(self.slots)} tensors")
        self._handle.close()


# copy_file_range's refusals that mean "not here" (copy through a buffer instead), not a failed write
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_COPY_BUFFER_BYTES = 16 * 2**20


def _write_all(handle, view: memoryview) -> None:
    """An unbuffered file's `write` may write less than it was given; write the rest."""
    done = 0
    while done < len(view):
        done += handle.write(view[done:])
