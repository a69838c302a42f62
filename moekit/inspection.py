"""`moekit inspect CHECKPOINT`: what a composed checkpoint holds and where it can be served, from its config
alone (whether a folder is one at all is `runtime.assembly.config.require_composed`). It sits above `export` (it asks
which native architecture the composition maps to), while the plan summary of a recipe stays in `plan/`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path



def checkpoint_summary(folder: Path) -> str:
    """Summarise a composed checkpoint from its config alone (the model is built on the meta device)."""
    import torch

    from .export.native import export_target
    from .plan.planner import active_parameters, tensor_roles
    from .plan.summary import balance_line, layer_structure, millions, shared_expert_lines, stream_lines
    from .runtime.assembly.config import MixtureKitConfig
    from .runtime.assembly.modeling import MixtureKitForCausalLM

    config = MixtureKitConfig.from_pretrained(folder)
    with torch.device("meta"):
        composed = MixtureKitForCausalLM(config)
    counts: Counter[str] = Counter()
    names_by_origin: dict[str, list[str]] = {}
    for name, (tensor, role, _) in tensor_roles(composed).items():
        counts[role] += tensor.numel()
        names_by_origin.setdefault("stack" if role == "stack" else role, []).append(name)
    target, how = export_target(config)
    export_line = f"serving export: {target} ({how})" if target else f"serving export: none: {how}"
    history = edit_lines(config)
    if config.method == "bts":
        return "\n".join([f"composed checkpoint: {folder}", *stream_lines(config, counts), *history, export_line])
    experts, k = config.num_experts, config.num_experts_per_tok
    total = sum(counts.values())
    active = active_parameters(total, counts["stack"], config)
    lines = [
        f"composed checkpoint: {folder}",
        f"method: {config.method}   architecture: {config.text_config.model_type}",
        f"experts ({experts}, top-{k}): {', '.join(config.expert_names)}",
        f"parameters: total {millions(total)}, active per token {millions(active)}",
        f"  stacked experts {millions(counts['stack'])}, shared {millions(counts['shared'])}, "
        f"routers {millions(counts['router'])}",
        *shared_expert_lines(config, counts["shared_expert"], counts["shared_gate"]),
        balance_line(config),
        "structure:",
        *layer_structure(names_by_origin),
        *history,
        export_line,
    ]
    return "\n".join(lines)


def edit_lines(config) -> list[str]:
    """The experts opted out and the edits made since composing (`moekit edit`), each expert's provenance."""
    lines = []
    if getattr(config, "disabled_experts", None):
        lines.append(f"opted out at inference (disabled_experts): {', '.join(config.disabled_experts)}")
    edits = getattr(config, "edits", None) or []
    if edits:
        lines.append("edits since composing (oldest first):")
        for edit in edits:
            what = f"  {edit.get('operation')}: {', '.join(edit.get('experts', []))}"
            if edit.get("source"):
                what += f" from {edit['source']} (router rows: {edit.get('router_init')})"
            if edit.get("scores"):
                what += f" ({edit.get('by')}: " + ", ".join(f"{n} {s:.3g}" for n, s in edit["scores"].items()) + ")"
            lines.append(what)
        added = {n: e["source"] for e in edits if e.get("operation") == "add" for n in e.get("experts", [])}
        lines.append("expert provenance: " + ", ".join(
            f"{n} (added from {added[n]})" if n in added else f"{n} (composed)" for n in config.expert_names))
    return lines
