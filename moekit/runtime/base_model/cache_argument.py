"""The KV cache's name: `past_key_values` in transformers up to 5.23, `cache` from 5.24 (the old name is deprecated).

The model accepts either from its callers (generate, PEFT, TRL and users of either release) and hands the cache on to
the dense model and the expert streams under the installed release's own name, so no deprecated argument is passed.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import MoeCausalLMOutputWithPast

CACHE_ARGUMENT = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")


def pop_cache(arguments: dict[str, Any]) -> Any:
    """Remove the cache from `arguments` under any of its names and return it (None when none is given)."""
    given = {name: arguments.pop(name) for name in CACHE_NAMES if name in arguments}
    given = {name: value for name, value in given.items() if value is not None}
    if len(given) > 1:
        raise ValueError("the KV cache was passed twice, as `cache` and as `past_key_values`; pass it once")
    return next(iter(given.values()), None)


def output_cache(outputs: Any) -> Any:
    """The cache a transformers model output carries, read under the installed release's name."""
    return outputs.get(CACHE_ARGUMENT)
