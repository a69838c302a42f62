"""Where each of our tensors comes from in an original MixtureKit checkpoint: a stored tensor, experts' tensors
stacked, or a value computed here; checked against what our config builds before anything is written."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import CheckpointError
from ..sources.safetensors_io import CheckpointReader

ROUTER_INIT_STD = 0.02  # as a recipe's default `router_init_std`


@dataclass(frozen=True)
class PlannedTensor:
    """One of our tensors: its dtype and shape, and its content as consecutive parts along the first dimension."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: Callable[[], Iterator[torch.Tensor]]


class SourcePlan:
    """Our tensors by name, each from their tensors (by name) or computed; what was read; what a user must know."""

    def __init__(self, reader: CheckpointReader, expected: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.reader, self.expected, self.dtype = reader, expected, dtype
        self.outputs: dict[str, PlannedTensor] = {}
        self.used: set[str] = set()
        self.new_routers: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.reader

    def stacked(self, ours: str, sources: list[str], transpose: bool = False) -> None:
        """`ours` [E, ...] from their per-expert tensors, concatenated along the first dimension in order."""
        missing = [s for s in sources if s not in self.reader]
        if missing:
            raise CheckpointError(f"the original checkpoint lacks '{missing[0]}', which its config implies "
                                  f"({len(missing)} such tensors): it is incomplete or not of release 1.1.1")
        self.used.update(sources)
        dtype = self.reader.info(sources[0]).dtype
        shapes = [tuple(self.reader.info(s).shape)[::-1] if transpose else tuple(self.reader.info(s).shape)
                  for s in sources]
        expected = self.expected[ours]
        fits = (shapes == [expected] if len(sources) == 1 and len(shapes[0]) == len(expected)
                else all(s[1:] == expected[-len(s) + 1:] if len(s) > 1 else True for s in shapes)
                and sum(torch.Size(s).numel() for s in shapes) == torch.Size(expected).numel())
        if not fits:
            raise CheckpointError(f"the original's '{sources[0]}' ({len(sources)} tensors, shapes {shapes[:2]}) does "
                                  f"not fit the converted model's '{ours}' {list(expected)}: its config.json does "
                                  "not describe its weights")

        def parts() -> Iterator[torch.Tensor]:
            for source in sources:
                tensor = self.reader.get(source)
                yield (tensor.t() if transpose else tensor).contiguous()

        self.outputs[ours] = PlannedTensor(dtype, self.expected[ours], parts)

    def copy(self, ours: str, theirs: str) -> None:
        self.stacked(ours, [theirs])

    def computed(self, ours: str, value: Callable[[], torch.Tensor]) -> None:
        self.outputs[ours] = PlannedTensor(self.dtype, self.expected[ours], lambda: iter([value().to(self.dtype)]))

    def router(self, ours: str, theirs: str) -> None:
        if self.has(theirs):
            self.copy(ours, theirs)
            return
        self.new_routers.append(ours)
        shape = self.expected[ours]
        seed = zlib.crc32(ours.encode())  # the same bytes at every conversion of the same checkpoint
        self.computed(ours, lambda: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * ROUTER_INIT_STD)

    def check(self) -> None:
        """Every tensor of ours has a source of its shape; every tensor of theirs was used."""
        missing = sorted(set(self.expected) - set(self.outputs))
        if missing:
            raise CheckpointError(f"no source in the original checkpoint for {len(missing)} tensors of the converted "
                                  f"model, e.g. '{missing[0]}': a layout this conversion does not know")
        unused = sorted(set(self.reader.names()) - self.used)
        if unused:
            raise CheckpointError(f"{len(unused)} tensors of the original checkpoint have no place in the converted "
                                  f"model, e.g. '{unused[0]}': a layout this conversion does not know")
