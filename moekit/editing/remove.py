"""Remove experts from a composed checkpoint: a smaller checkpoint that is exactly the old model with their router
logits masked to -inf (traditional, btx) or their streams left out of every stitch (bts) — what
`MixtureKitForCausalLM.disable_experts` computes without rewriting."""

from __future__ import annotations

from pathlib import Path

from ..errors import MixtureKitError, did_you_mean
from ..runtime.assembly.config import MixtureKitConfig, require_composed
from .rewrite import edited_checkpoint


class EditError(MixtureKitError, ValueError):
    """An edit of a composed checkpoint is invalid: an unknown expert, too few experts left, an incompatible source."""


def experts_to_keep(config: MixtureKitConfig, remove: list[str]) -> list[int]:
    """The indices of the experts that stay, or an EditError naming what is wrong (before anything is written)."""
    names = list(config.expert_names)
    if not remove:
        raise EditError("no expert to remove was named; give one of " + ", ".join(names))
    unknown = [n for n in remove if n not in names]
    if unknown:
        raise EditError(f"no expert named {unknown[0]!r} in this checkpoint{did_you_mean(unknown[0], names)}; "
                        f"its experts are {', '.join(names)}")
    keep = [i for i, n in enumerate(names) if n not in set(remove)]
    needed = 1 if config.method == "bts" else config.num_experts_per_tok
    if len(keep) < max(needed, 1):
        why = ("bts needs at least one expert stream" if config.method == "bts" else
               f"top-{config.num_experts_per_tok} routing (num_experts_per_tok) needs at least "
               f"{config.num_experts_per_tok} experts")
        raise EditError(f"removing {', '.join(remove)} would leave {len(keep)} of {len(names)} experts, and {why}; "
                        "remove fewer")
    return keep


def remove_experts(checkpoint: str | Path, names: list[str] | str, output: str | Path, overwrite: bool = False,
                   progress: bool = False, operation: str = "remove", details: dict | None = None) -> Path:
    """Write `checkpoint` without the experts `names` to `output` and return its path."""
    require_composed(checkpoint, "only a composition has experts to remove", EditError)
    names = [names] if isinstance(names, str) else list(names)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    keep = experts_to_keep(config, names)
    edit = {"operation": operation, "experts": names, **(details or {})}
    return edited_checkpoint(checkpoint, output, keep, edit, overwrite=overwrite, progress=progress)
