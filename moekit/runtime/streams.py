"""Run frozen expert streams block by block beside the hub, with their own model code, masks and KV caches.

Each expert stream is its base model as `transformers` builds it. To step it block by block without rewriting its
forward, we run that forward once with its blocks swapped for recorders: this yields, from the model's own code,
the hidden state entering block 0 and the exact arguments (masks, rotary embeddings, cache) each block is called
with. The real blocks then run with those arguments when the hub reaches a stitch. The hub's block list is given a
subclass whose iteration, only while a BTS forward runs, calls a hook after each block: there the stitches act, and
outside any checkpointed block, so activation checkpointing never replays them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MixtureKitError, UnsupportedArchitectureError


class _BlockCall:
    """A hub block that hands its output to the stitch hook."""

    def __init__(self, block: nn.Module, index: int, hook: Callable[[int, Any], Any]):
        self.block, self.index, self.hook = block, index, hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hook(self.index, self.block(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.block, name)


class StitchedBlockList(nn.ModuleList):
    """The hub's decoder blocks; while `after_block` is set, iterating them yields blocks followed by the hook."""

    after_block: Callable[[int, Any], Any] | None = None

    def _calls(self, blocks: list[nn.Module], start: int) -> list[Any]:
        return [_BlockCall(b, start + i, self.after_block) for i, b in enumerate(blocks)]

    def __iter__(self):
        if self.after_block is None:
            return super().__iter__()
        return iter(self._calls(list(self._modules.values()), 0))

    def __getitem__(self, index):
        if self.after_block is None or not isinstance(index, slice):
            return super().__getitem__(index)
        start = range(len(self))[index].start if len(range(len(self))[index]) else 0
        return self._calls(list(self._modules.values())[index], start)


class _BlockInputRecorder(nn.Module):
    """Stands in for a block during the capture pass: records its call and passes the hidden state through."""

    def __init__(self, block: nn.Module, calls: list):
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "calls", calls)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class StreamState:
    """One expert stream during a forward pass: its hidden state, how many blocks ran, and each block's call."""

    hidden: torch.Tensor
    blocks: nn.ModuleList
    calls: list[tuple[tuple, dict]]
    done: int = 0

    def advance_to(self, depth: int) -> None:
        while self.done < depth:
            args, kwargs = self.calls[self.done]
            output = self.blocks[self.done](self.hidden, *args, **kwargs)
            self.hidden = output[0] if isinstance(output, tuple) else output
            self.done += 1


def capture_stream(stream: nn.Module, blocks: nn.ModuleList, inputs: dict[str, Any]) -> StreamState:
    """Run the stream's own forward with recorders in place of its blocks; return its state before block 0."""
    calls: list = []
    originals = dict(blocks._modules)
    blocks._modules = {key: _BlockInputRecorder(block, calls) for key, block in originals.items()}
    try:
        stream(**inputs)
    except MixtureKitError:
        raise
    except Exception as error:  # a family whose forward does not survive recorders in place of its blocks
        raise UnsupportedArchitectureError(
            f"bts cannot run {type(stream).__name__} as a stream: its forward failed with its blocks recorded one by "
            f"one ({type(error).__name__}: {error})") from error
    finally:
        blocks._modules = originals
    if len(calls) != len(originals):
        raise UnsupportedArchitectureError(
            f"bts cannot run {type(stream).__name__} as a stream: its forward called {len(calls)} of its "
            f"{len(originals)} blocks once each (a family that skips or repeats blocks cannot be stitched block by "
            "block)")
    initial = calls[0][0]
    width = getattr(getattr(stream, "config", None), "hidden_size", None)
    if isinstance(width, int) and initial.shape[-1] != width:
        raise UnsupportedArchitectureError(
            f"bts cannot stitch {type(stream).__name__}: its blocks pass a residual stream {initial.shape[-1]} wide, "
            f"not its hidden size {width} (several parallel residual streams, as hyper-connections keep), and the "
            "stitches map hidden states of the hidden size")
    return StreamState(hidden=initial, blocks=blocks, calls=[(args, kwargs) for _, args, kwargs in calls])


def replace_output(output: Any, hidden: torch.Tensor) -> Any:
    """A block's output with its hidden state replaced (blocks return a tensor, or a tuple starting with one)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
