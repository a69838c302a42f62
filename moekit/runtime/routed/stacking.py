"""How a stacked `[E, ...]` tensor of a routed module is built from each expert's dense tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StackSource:
    """One stacked parameter: the dense tensors it is made of (names relative to the replaced module), per expert.

    Several names are concatenated along their first dimension (gate then up); `transpose` turns a GPT-2 `Conv1D`
    weight `[in, out]` into the `[out, in]` layout of a Linear.
    """

    names: tuple[str, ...]
    transpose: bool = False
