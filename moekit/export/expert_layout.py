"""How a native MoE export stores its experts.

`packed` is transformers 5's own layout: per block one `mlp.experts.gate_up_proj [E, 2f, d]` (gate rows first) and one
`mlp.experts.down_proj [E, d, f]`. `per-expert` is the layout of the Mixtral and Qwen-MoE checkpoints on the Hub: one
Linear weight per expert and projection (Mixtral: `block_sparse_moe.experts.N.w1/w3/w2` and `block_sparse_moe.gate`;
Qwen-MoE: `mlp.experts.N.gate_proj/up_proj/down_proj`). Engines written against the Hub checkpoints read the second;
llama.cpp's converter (0.3.36) reads only it for Mixtral, and transformers 5 converts it to the packed layout on load.
Qwen3-VL-MoE's Hub checkpoints are the exception: they keep one tensor per block and projection, stored transposed
(`gate_up_proj [E, d, 2f]`, `down_proj [E, f, d]`), which transformers transposes back on load where the shape differs
from its own; `per-expert` writes that layout for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..sources.safetensors_io import TensorSlot
from .targets import ExportTarget

LAYOUTS = ("per-expert", "packed")
_PACKED = re.compile(r"^(?P<block>.*\.layers\.\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<block>.*\.layers\.\d+)\.mlp\.gate\.weight$")


class Piece(NamedTuple):
    """An output tensor as a slice of a stored one: `expert` of `source` (None: the whole tensor), rows `rows`,
    multiplied by `scale` (a routed `down_proj` beside a shared expert: ½), its last two dimensions swapped if
    `transposed` (Qwen3-VL-MoE's Hub layout)."""

    source: str
    expert: int | None = None
    rows: slice = slice(None)
    scale: float = 1.0
    transposed: bool = False


def is_routed_down_proj(name: str) -> bool:
    """Whether a stored tensor is a block's stacked routed `down_proj` (`….mlp.experts.down_proj`)."""
    packed = _PACKED.match(name)
    return packed is not None and packed["kind"] == "down_proj"


def per_expert_pieces(slots: list[TensorSlot], target: ExportTarget) -> list[tuple[TensorSlot, Piece]]:
    """The per-expert layout of `slots` (packed tensors split per expert and projection, routers renamed), each
    output slot with the piece of a stored tensor it holds; other tensors pass through unchanged."""
    if target.transposed_hub_layout:
        return [(TensorSlot(slot.name, slot.dtype, (*slot.shape[:-2], slot.shape[-1], slot.shape[-2])),
                 Piece(slot.name, transposed=True)) if _PACKED.match(slot.name) else (slot, Piece(slot.name))
                for slot in slots]
    experts, gate, up, down, router = target.expert_names
    out = []
    for slot in slots:
        packed, routing = _PACKED.match(slot.name), _ROUTER.match(slot.name)
        if packed:
            block, count = packed["block"], slot.shape[0]
            if packed["kind"] == "gate_up_proj":
                width = slot.shape[1] // 2
                for expert in range(count):
                    for name, rows in ((gate, slice(0, width)), (up, slice(width, 2 * width))):
                        out.append((TensorSlot(f"{block}.{experts}.{expert}.{name}.weight", slot.dtype,
                                               (width, slot.shape[2])), Piece(slot.name, expert, rows)))
            else:
                for expert in range(count):
                    out.append((TensorSlot(f"{block}.{experts}.{expert}.{down}.weight", slot.dtype, slot.shape[1:]),
                                Piece(slot.name, expert)))
        elif routing:
            out.append((TensorSlot(f"{routing['block']}.{router}", slot.dtype, slot.shape), Piece(slot.name)))
        else:
            out.append((slot, Piece(slot.name)))
    return out


def piece_reader(get: Callable[[str], torch.Tensor]) -> Callable[[Piece], torch.Tensor]:
    """Reads pieces through `get`, keeping the last stored tensor read: the pieces of one packed tensor come one after
    another, so each stored tensor is read once and at most one is held."""
    last: dict[str, torch.Tensor] = {}

    def read(piece: Piece) -> torch.Tensor:
        if piece.source not in last:
            last.clear()
            last[piece.source] = get(piece.source)
        tensor = last[piece.source]
        if piece.expert is not None:
            tensor = tensor[piece.expert][piece.rows].contiguous()
        if piece.transposed:
            tensor = tensor.transpose(-1, -2).contiguous()
        return tensor if piece.scale == 1.0 else tensor * piece.scale

    return read
