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

from ...errors import MixtureKitError, UnsupportedArchitectureError


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
    """Stands in for a block during the capture pass: records its call and passes the hidden state through, as a
    1-tuple where the family's blocks return tuples (GPT-Neo's loop takes `outputs[0]`)."""

    def __init__(self, block: nn.Module, calls: list, as_tuple: bool = False):
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "calls", calls)
        object.__setattr__(self, "as_tuple", as_tuple)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        return (hidden_states,) if self.as_tuple else hidden_states


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
            self.hidden = output[0] if isinstance(output, (tuple, list)) else output
            self.done += 1


def capture_stream(stream: nn.Module, blocks: nn.ModuleList, inputs: dict[str, Any]) -> StreamState:
    """Run the stream's own forward with recorders in place of its blocks; return its state before block 0. Blocks
    return the hidden state or a tuple starting with it, which the model's loop unpacks: recorders return the
    hidden state, and where the forward fails so, a 1-tuple (the recorders touch no cache, so the retry is clean)."""
    originals = dict(blocks._modules)
    failure: Exception | None = None
    for as_tuple in (False, True):
        calls: list = []
        blocks._modules = {key: _BlockInputRecorder(block, calls, as_tuple) for key, block in originals.items()}
        try:
            stream(**inputs)
            break
        except MixtureKitError:
            raise
        except Exception as error:  # noqa: BLE001  (a family whose forward does not survive recorders)
            failure = failure or error
        finally:
            blocks._modules = originals
    else:
        raise UnsupportedArchitectureError(_capture_failure(stream, blocks, calls, failure)) from failure
    if len(calls) != len(originals):
        raise UnsupportedArchitectureError(
            f"bts cannot run {type(stream).__name__} as a stream: its forward called {len(calls)} of its "
            f"{len(originals)} blocks once each (a family that skips or repeats blocks cannot be stitched block by "
            "block)")
    initial = calls[0][0]
    return StreamState(hidden=initial, blocks=blocks, calls=[(args, kwargs) for _, args, kwargs in calls])


def _capture_failure(stream: nn.Module, blocks: nn.ModuleList, calls: list, error: Exception) -> str:
    """Why a stream's forward failed with recorders in place of its blocks: in words where its first block, run on
    what it was called with, returns more than the hidden state (GLM-5 and HY-V4 hand each block's sparse-attention
    top-k indices to the next one), which no recorded call can stand in for once a stitch changes the hidden state."""
    name = type(stream).__name__
    if calls:
        hidden, args, kwargs = calls[0]
        try:
            with torch.no_grad():
                output = blocks[0](hidden, *args, **kwargs)
        except Exception:  # noqa: BLE001  (the message below names the forward's own error)
            output = None
        extras = [type(item).__name__ for item in output[1:] if item is not None] if isinstance(output, tuple) else []
        if extras:
            return (f"bts cannot run {name} as a stream: its blocks ({type(blocks[0]).__name__}) return "
                    f"{', '.join(extras)} beside the hidden state, which its forward hands on to the next block, so "
                    "its blocks cannot be run one at a time between stitches")
    return (f"bts cannot run {name} as a stream: its forward failed with its blocks recorded one by one "
            f"({type(error).__name__}: {error})")


def replace_output(output: Any, hidden: torch.Tensor) -> Any:
    """A block's output with its hidden state replaced (blocks return a tensor, or a tuple starting with one; the
    original GPT's blocks a list)."""
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
