"""`moekit edit`: exactly one edit of a composed checkpoint, chosen by which of its options is given."""

from __future__ import annotations

from pathlib import Path

from .add import add_expert
from .prune import prune_experts
from .remove import EditError, remove_experts
from .router_fit import fit_routers_from_data


def edit_checkpoint(
    checkpoint: Path, output: Path, remove: list[str] | None = None, add: str | None = None, prune: int | None = None,
    data: Path | None = None, router_data: list[str] | None = None, by: str = "usage", overwrite: bool = False,
) -> tuple[Path, dict[str, float] | None]:
    """The edited checkpoint's folder, and for --prune each expert's score (None for the other edits)."""
    chosen = [flag for flag, value in (("--remove", remove), ("--add", add), ("--prune", prune),
                                       ("--router-data", router_data)) if value]
    if len(chosen) != 1:
        raise EditError(f"give exactly one of --remove NAME, --add NAME=SOURCE, --prune N --data FILE, "
                        f"--router-data NAME=FILE (got {', '.join(chosen) or 'none'})")
    if router_data:
        pairs = [entry.partition("=") for entry in router_data]
        bad = [entry for entry, (name, sep, file) in zip(router_data, pairs) if not (name and sep and file)]
        if bad:
            raise EditError(f"--router-data takes NAME=FILE (an expert and its texts), got {bad[0]!r}")
        return fit_routers_from_data(checkpoint, {name: Path(file) for name, _, file in pairs}, output,
                                     overwrite=overwrite, progress=True), None
    if remove:
        return remove_experts(checkpoint, list(remove), output, overwrite=overwrite, progress=True), None
    if add:
        name, sep, source = add.partition("=")
        if not sep or not name or not source:
            raise EditError(f"--add takes NAME=SOURCE (a name and a dense checkpoint), got {add!r}")
        return add_expert(checkpoint, name, source, output, overwrite=overwrite, progress=True), None
    if data is None:
        raise EditError("--prune needs --data FILE: the texts whose routing decides which experts go")
    return prune_experts(checkpoint, prune, data, output, overwrite=overwrite, progress=True, by=by)
