"""Human-readable summaries of a plan or of a composed checkpoint, for `moekit inspect`."""

from __future__ import annotations

import re
from collections import Counter

from .planner import CompositionPlan

_LAYER = re.compile(r"\.(\d+)\.")


def millions(count: int) -> str:
    return f"{count / 1e6:,.2f}M"


def layer_structure(names_by_origin: dict[str, list[str]]) -> list[str]:
    """One line per distinct block structure: which blocks, and what is routed in them."""
    routed_by_layer: dict[int, set[str]] = {}
    for name in names_by_origin.get("stack", []):
        match = _LAYER.search(name)
        if match:
            module = name[match.end():].rsplit(".", 1)[0] if "experts." not in name else "mlp (whole FFN)"
            routed_by_layer.setdefault(int(match.group(1)), set()).add(module.replace(".experts", ""))
    groups: dict[tuple[str, ...], list[int]] = {}
    for layer, modules in sorted(routed_by_layer.items()):
        groups.setdefault(tuple(sorted(modules)), []).append(layer)
    return [f"  blocks {layers}: routed {', '.join(modules)}" for modules, layers in groups.items()]


def shared_expert_lines(config, expert_parameters: int, gate_parameters: int, origin: str = "") -> list[str]:
    """traditional/btx: what the shared expert is and how it mixes (nothing without one)."""
    if config.shared_expert is None:
        return []
    what = "the base's FFN" if config.method == "traditional" else "the base's own Linear beside each routed one"
    where = "block" if config.method == "traditional" else "routed Linear"
    weight = ("s = sigmoid(shared_expert_gate · x), gate zero at composition (s = ½)" if config.shared_expert_gate
              else "s = ½ (no gate)")
    return [f"  shared expert ({what}{origin}), always on: {millions(expert_parameters)}"
            + (f", gate {millions(gate_parameters)}" if config.shared_expert_gate else ""),
            f"    mix per {where}: ½ · routed + s · shared, {weight}"]


def balance_line(config) -> str:
    """How training balances the routers: the balance mode and what it uses (`balance`, `alpha`, `alpha_mode`)."""
    mode = getattr(config, "balance", "loss")
    alpha = config.alpha if config.alpha_mode == "fixed" else f"{config.alpha} (auto, up to {config.alpha_max})"
    switch = f"Switch loss alpha {alpha}" if config.alpha > 0 or config.alpha_mode == "auto" else "no Switch loss"
    if mode == "bias":
        return (f"balance: bias (loss-free: per-expert selection bias, rate {config.balance_bias_rate} a step; "
                f"{switch} beside it)")
    return f"balance: loss ({switch})"


def _vision_note(plan, shared_how: str) -> str:
    """For image-text sources: whether the vision tower and projector are kept (and how) or dropped."""
    from ..runtime.base_model.architecture import is_multimodal

    if plan.config.is_multimodal:
        return f"   vision: kept (tower and projector {shared_how})"
    return "   vision: dropped (text-only)" if is_multimodal(plan.models[plan.reference].config) else ""


def stream_lines(config, counts: Counter, origins: dict[str, str] | None = None) -> list[str]:
    """bts: the hub, each stream's shape, where the stitches sit, and what runs per token."""
    from ..runtime.base_model.architecture import language_config, num_layers
    from ..runtime.bts.stitch import matching_depths, stitch_directions

    origins = origins or {}
    text, points = config.text_config, config.stitch_layers_index
    hub_blocks = num_layers(text)

    def shape(c) -> str:
        vision = f" + its vision path" if language_config(c) is not c else ""
        return f"{c.model_type}, hidden {language_config(c).hidden_size}, {num_layers(c)} blocks{vision}"

    hub = origins.get("hub", f"{getattr(config, 'hub_name', 'hub')} ")
    lines = [f"method: bts   hub: {hub}({shape(text)})",
             f"expert streams ({config.num_experts}), frozen, every one runs on every token:"]
    for name, stream in zip(config.expert_names, config.expert_config_objects()):
        depths = matching_depths(points, hub_blocks, num_layers(stream))
        where = f" <- {origins[name]}" if name in origins else ""
        lines.append(f"  {name} ({shape(stream)}){where}; its blocks done at each stitch: {depths}")
    directions = getattr(config, "stitch_directions", None) or stitch_directions(len(points))
    lines += [
        "stitches after hub blocks: " + ", ".join(f"{p} ({d})" for p, d in zip(points, directions)),
        f"parameters: total {millions(sum(counts.values()))}, active per token {millions(sum(counts.values()))}",
        f"  hub {millions(counts['shared'])}, expert streams {millions(counts['stream'])}, "
        f"stitches {millions(counts['stitch'])} (trainable by default; identity at initialisation)",
    ]
    return lines


def source_description(model) -> str:
    """Where a source comes from; for a PEFT LoRA adapter, its folder, rank and scale, and the base it adapts."""
    if not model.origin.startswith("lora:"):
        return model.origin
    import json
    from pathlib import Path

    folder = Path(model.origin.removeprefix("lora:"))
    settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    rank, alpha = settings.get("r"), settings.get("lora_alpha", settings.get("r"))
    return f"LoRA adapter {folder} (r={rank}, alpha={alpha}) over {model.folder}"


def plan_summary(plan: CompositionPlan) -> str:
    config = plan.config
    if config.method == "bts":
        counts: Counter[str] = Counter()
        for tensor in plan.tensors:
            counts["stitch" if tensor.origin == "new" else "stream" if tensor.name.startswith("streams.")
                   else "shared"] += tensor.numel
        hub = plan.models[plan.reference]
        origins = {"hub": f"{hub.name} <- {hub.origin} "} | {plan.models[i].name: plan.models[i].origin
                                                             for i in plan.expert_models}
        lines = stream_lines(config, counts, origins) + [f"note: {note}" for note in plan.warnings]
        return "\n".join(lines)
    from ..runtime.routed.shared_expert import SHARED_EXPERT_GATE, is_shared_expert_tensor

    names_by_origin: dict[str, list[str]] = {}
    for tensor in plan.tensors:
        origin = tensor.origin if not is_shared_expert_tensor(tensor.name) else "shared_expert"
        names_by_origin.setdefault(origin, []).append(tensor.name)
    in_shared_expert = [t for t in plan.tensors if is_shared_expert_tensor(t.name)]
    gate_count = sum(t.numel for t in in_shared_expert if f".{SHARED_EXPERT_GATE}." in t.name)
    base = plan.recipe.base
    shared_how = "copied from base" if plan.recipe.shared_weights == "base" else "float32 mean over the experts"
    lines = [
        f"method: {config.method}   architecture: {config.text_config.model_type}   dtype: {str(plan.dtype)[6:]}"
        + _vision_note(plan, shared_how),
        f"experts ({config.num_experts}, top-{config.num_experts_per_tok}): "
        + ", ".join(f"{plan.models[i].name} <- {source_description(plan.models[i])}" for i in plan.expert_models),
        f"parameters: total {millions(plan.total_parameters)}, active per token {millions(plan.active_parameters)}",
        f"  stacked experts {millions(plan.count('stack'))} ({len(names_by_origin.get('stack', []))} tensors)",
        f"  shared ({shared_how}) "
        f"{millions(plan.count('average') + plan.count('copy') - sum(t.numel for t in in_shared_expert) + gate_count)} "
        f"({len(names_by_origin.get('average', [])) + len(names_by_origin.get('copy', []))} tensors)",
        f"  new routers {millions(plan.count('new') - gate_count)} ({len(names_by_origin.get('new', []))} tensors, "
        f"init: {plan.recipe.router_init})",
        *shared_expert_lines(config, sum(t.numel for t in in_shared_expert) - gate_count, gate_count,
                             f" <- {base.name}" if base is not None else ""),
        balance_line(config),
        "structure:",
        *layer_structure(names_by_origin),
    ]
    if plan.ignored_source_tensors:
        lines.append(f"source tensors not used: {', '.join(plan.ignored_source_tensors)}")
    lines += [f"note: {note}" for note in plan.warnings]
    return "\n".join(lines)
