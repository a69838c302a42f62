"""bts in the original MixtureKit's layout: its expert streams' names, its stitch points and directions, and where
each stitch tensor of ours comes from in its checkpoint."""

from __future__ import annotations

import torch

from ..distribution import OTHER_IMPORT_NAME
from ..errors import CheckpointError
from ..runtime.bts.stitch import BROADCAST, MERGE
from .source_plan import SourcePlan


def _original_stream_name(dense_name: str, slot: int) -> str | None:
    """Where the original keeps expert `slot`'s copy of the dense tensor `dense_name` (its `_bts_key` rule): the
    blocks under `expert_layers.<block>.<slot>`, the token embedding under `expert_embed_tokens.<slot>`; None for
    what its experts share with the hub (final norm, rotary tables)."""
    prefix, _, leaf = dense_name.rpartition(".")
    if "model.layers." in prefix:
        block, _, sub_path = prefix.split("model.layers.", 1)[1].partition(".")
        return ".".join(p for p in (f"model.expert_layers.{block}.{slot}", sub_path, leaf) if p)
    if prefix.split(".")[-1] == "embed_tokens":
        return f"model.expert_embed_tokens.{slot}.{leaf}"
    return None


def original_stitch_points(config: dict, num_blocks: int) -> list[int]:
    """The original's stitch blocks: `stitch_layers_index`, else every block i with i % stitch_freq == 0 (not 0),
    and always the last block; in its order."""
    points = list(config.get("stitch_layers_index") or []) or [
        i for i in range(num_blocks) if i % config.get("stitch_freq", 5) == 0 and i != 0]
    if num_blocks - 1 not in points:
        points.append(num_blocks - 1)
    return points


def original_stitch_directions(points: list[int], num_blocks: int) -> list[str]:
    """The original alternates from a broadcast (hub into experts) and forces the last block's stitch to a merge."""
    directions, merge = [], False
    for point in points:
        merge = merge or point == num_blocks - 1
        directions.append(MERGE if merge else BROADCAST)
        merge = not merge
    return directions


def _is_identity(matrix: torch.Tensor) -> bool:
    return matrix.shape[0] == matrix.shape[-1] and torch.equal(matrix, torch.eye(matrix.shape[0], dtype=matrix.dtype))


def stitch_sources(plan: SourcePlan, points: list[int], directions: list[str], experts: int,
                    hidden: int) -> tuple[list[str], bool]:
    """Ours at scale 1 are the paper's forms, which theirs compute: merge `softmax over [hub, experts] of w_gate_j
    h_hub`, per dimension; broadcast `(1 - g_i) h_i + g_i P_i(h_hub)`, `g_i = sigmoid(w_gate_{i+1} h_hub)` (their
    w_gate_0 is unused there), their one `w_proj_i` serving both ways. Returns notes for the user, and whether the
    two models compute different functions."""
    notes, untrained, differs = [], True, False
    for k, (block, direction) in enumerate(zip(points, directions)):
        theirs, ours = f"model.layers.{block}.stitches", f"stitches.{k}"
        gates = [f"{theirs}.w_gate.{j}.weight" for j in range(experts + 1)]
        projections = [f"{theirs}.w_proj.{i}.weight" for i in range(experts)]
        if not all(plan.has(name) for name in gates + projections):
            raise CheckpointError(
                f"the original checkpoint lacks the stitch weights of block {block} ('{theirs}.*'): its release 1.1.1 "
                f"writes them at build; bring an older checkpoint over with `{OTHER_IMPORT_NAME}.upgrade_checkpoint` "
                "first")
        for i, projection in enumerate(projections):
            plan.copy(f"{ours}.projections.{i}.weight", projection)
        identity = all(_is_identity(plan.reader.get(p)) for p in projections)
        untrained = untrained and identity and not any(plan.reader.get(g).any() for g in gates)
        if direction == MERGE:
            plan.stacked(f"{ours}.gate.weight", gates)
            plan.computed(f"{ours}.gate.bias", lambda: torch.zeros((experts + 1) * hidden))
            plan.computed(f"{ours}.scale", lambda: torch.ones(hidden))
            if k < len(points) - 1 and not identity:
                differs = True
                notes.append(
                    f"its stitch after block {block} merges into the hub before the last one, with projections that "
                    "are not the identity: the original then continues each expert stream from its projection into "
                    "the hub's space (its merge returns the projected states as the experts' new states); in the BTS "
                    "paper, and here, a merge changes only the hub and the experts continue from their own states. "
                    "The converted model computes the paper's function, so its logits differ from the original's")
        else:
            plan.used.add(gates[0])  # w_gate_0: no role in a broadcast
            for i in range(experts):
                plan.copy(f"{ours}.gates.{i}.weight", gates[i + 1])
                plan.computed(f"{ours}.gates.{i}.bias", lambda: torch.zeros(hidden))
                plan.computed(f"{ours}.scales.{i}", lambda: torch.ones(hidden))
    if untrained:
        notes.append(
            "its stitches are as its build writes them (zero gates, identity projections), which is not the identity: "
            "each broadcast mixes the expert streams half and half with the hub, and the last merge averages the hub "
            "and the experts evenly; converted as they are. A moekit composition of the same models starts at the "
            "hub's own logits instead (`moekit compose` with the recipe written beside the weights)")
    return notes, differs


def stream_sources(plan: SourcePlan, names: list[str], prefix: str) -> None:
    """Our stream `streams.<name>.<rest>` is the dense model's `<prefix>.<rest>` of expert slot i in theirs; what
    their experts share with the hub (its final norm: no stream reaches it) comes from the hub."""
    for ours in plan.expected:
        if not ours.startswith("streams."):
            continue
        name, rest = ours[len("streams."):].split(".", 1)
        dense = f"{prefix}.{rest}"
        theirs = _original_stream_name(dense, names.index(name))
        if theirs is None:
            plan.copy(ours, dense)
        else:
            plan.copy(ours, theirs)
