"""Reads the config dict of the original MixtureKit ``build_moe(config)`` so its users move over unchanged."""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError

LEGACY_KEYS = {
    "moe_method", "model_type", "num_experts_per_tok", "experts", "router_layers",
    "router_layers_index", "alpha", "stitch_freq",
}
# Our own fields that may stand beside the legacy ones (e.g. to pick an output folder).
PASSTHROUGH_KEYS = {"output", "dtype", "shard_size", "seed", "router_init", "router_init_std", "stitch_dropout"}


def is_legacy_recipe(data: dict[str, Any]) -> bool:
    """True for the original's dict: it names the method `moe_method` and experts by `expert_name`/`model_id`."""
    experts = data.get("experts")
    legacy_experts = isinstance(experts, list) and any(
        isinstance(e, dict) and ("expert_name" in e or "model_id" in e) for e in experts
    )
    return "moe_method" in data or legacy_experts


def translate_legacy_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """Map the original keys onto a recipe dict.

    The original's first expert (``base_expert``) is a routed expert for traditional/btx and the hub for bts;
    ``model_type`` named the output (written to ``models_merge/<model_type>``); ``router_layers_index: []`` meant
    every block; ``router_layers`` applied to btx only.
    """
    unknown = sorted(set(data) - LEGACY_KEYS - PASSTHROUGH_KEYS)
    if unknown:
        raise RecipeError(
            f"unknown keys {unknown} in an original-MixtureKit config; its keys are {sorted(LEGACY_KEYS)}"
        )
    if "moe_method" not in data:
        raise RecipeError("an original-MixtureKit config needs `moe_method` (traditional, btx or bts)")
    method = data["moe_method"]
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError("`experts` must be a non-empty list of {expert_name, model_id}")
    translated_experts = []
    for position, expert in enumerate(experts):
        if not isinstance(expert, dict) or set(expert) - {"expert_name", "model_id"} or "model_id" not in expert:
            raise RecipeError(
                f"experts[{position}] must be {{expert_name: ..., model_id: ...}}, got {expert!r}"
            )
        translated_experts.append(
            {"name": str(expert.get("expert_name", f"expert_{position}")), "source": str(expert["model_id"])}
        )
    recipe: dict[str, Any] = {"method": method, "experts": translated_experts}
    for key in ("num_experts_per_tok", "alpha", "stitch_freq"):
        if data.get(key) is not None:
            recipe[key] = data[key]
    if data.get("router_layers_index"):
        recipe["router_layers_index"] = data["router_layers_index"]
    if method == "btx" and data.get("router_layers"):
        recipe["router_layers"] = data["router_layers"]
    if method == "bts":
        recipe["hub"] = translated_experts[0]["name"]
    if data.get("model_type") and "output" not in data:
        recipe["output"] = f"models_merge/{data['model_type']}"
    for key in PASSTHROUGH_KEYS & set(data):
        recipe[key] = data[key]
    return recipe
