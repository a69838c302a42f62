"""`build_moe(config)`: the original MixtureKit entry point, with its config dict unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .compose import compose
from .recipe import load_recipe


def build_moe(config: dict[str, Any], torch_dtype: Any = None, output_dir: str | Path | None = None,
              overwrite: bool = False, **ignored: Any) -> Path:
    """Compose from an original-MixtureKit config (``moe_method``, ``experts: [{expert_name, model_id}]``, ...).

    Like the original, the result goes to ``models_merge/<model_type>`` unless `output_dir` is given. The original's
    `moe_architecture` and `model_cls` arguments are accepted and ignored: the method comes from ``moe_method`` and
    the architecture from the experts' own configs.
    """
    data = dict(config)
    if torch_dtype is not None:
        data.setdefault("dtype", str(torch_dtype).removeprefix("torch."))
    recipe = load_recipe(data)
    return compose(recipe, output=output_dir, overwrite=overwrite)
