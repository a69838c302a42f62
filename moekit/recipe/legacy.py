"""Reads the config dict of the original MixtureKit ``build_moe(config)`` so its users move over unchanged."""

from __future__ import annotations

import difflib
import re
from typing import Any

from ..errors import RecipeError

LEGACY_KEYS = {
    "moe_method", "model_type", "num_experts_per_tok", "experts", "router_layers",
    "router_layers_index", "alpha", "stitch_freq",
}
# Our own fields that may stand beside the legacy ones (e.g. to pick an output folder).
PASSTHROUGH_KEYS = {"output", "dtype", "shard_size", "seed", "router_init", "router_init_std", "stitch_dropout"}
# `model_type` names the output folder under models_merge/: one folder name, never a path out of it.
_MODEL_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    if "moe_method" not in data and "method" in data:
        raise RecipeError(
            "`experts` use the original-MixtureKit keys expert_name/model_id but the method is given as `method`: "
            "write each expert as {name: ..., source: ...}, or use `moe_method` with {expert_name, model_id}"
        )
    unknown = sorted(set(data) - LEGACY_KEYS - PASSTHROUGH_KEYS)
    if unknown:
        valid = sorted(LEGACY_KEYS | PASSTHROUGH_KEYS)
        hints = [f"'{key}' (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(key, valid, n=1))
                 else f"'{key}'" for key in unknown]
        raise RecipeError(
            f"unknown keys {', '.join(hints)} in an original-MixtureKit config; its keys are {sorted(LEGACY_KEYS)}"
            f" (and {sorted(PASSTHROUGH_KEYS)} from MixtureKit recipes)"
        )
    if "moe_method" not in data:
        raise RecipeError("an original-MixtureKit config needs `moe_method` (traditional, btx or bts)")
    method = data["moe_method"]
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError("`experts` must be a non-empty list of {expert_name, model_id}")
    translated_experts = []
    for position, expert in enumerate(experts):
        if (not isinstance(expert, dict) or set(expert) - {"expert_name", "model_id"} or "model_id" not in expert
                or not all(isinstance(value, str) for value in expert.values())):
            raise RecipeError(
                f"experts[{position}] must be {{expert_name: <name>, model_id: <path or Hub id>}} with string "
                f"values, got {expert!r}"
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
    model_type = data.get("model_type")
    if "output" not in data and model_type and (
            not isinstance(model_type, str) or not _MODEL_TYPE.match(model_type) or ".." in model_type):
        raise RecipeError(
            f"model_type {model_type!r} names the output folder models_merge/<model_type>: use one folder name of "
            "letters, digits, '_', '-' and '.' (no '/' or '..'), or give `output`"
        )
    if model_type and "output" not in data:
        recipe["output"] = f"models_merge/{model_type}"
    for key in PASSTHROUGH_KEYS & set(data):
        recipe[key] = data[key]
    return recipe
