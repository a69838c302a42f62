"""The model card (README.md) of a composed checkpoint: what it is made of, and how to load it."""

from __future__ import annotations

from pathlib import Path

from ..distribution import VERSION, install_instruction
from ..plan import CompositionPlan
from ..plan.summary import plan_summary
from ..sources.checkpoint_folder import card_front_matter


def _what_it_is(plan: CompositionPlan) -> str:
    config = plan.config
    if config.method == "bts":
        return (f"A Branch-Train-Stitch (`bts`) model: the hub `{plan.models[plan.reference].name}` and "
                f"{config.num_experts} frozen expert streams joined by {len(config.stitch_layers_index)} stitch "
                "layers. The stitches are stored at their initial values, where the model gives exactly the hub's "
                "logits: train them before use.")
    if plan.recipe.router_init == "data":
        return (f"A `{config.method}` Mixture-of-Experts over {config.num_experts} `{config.text_config.model_type}` "
                f"models, top-{config.num_experts_per_tok} routing. The routers were fitted without training from a "
                "sample of each expert's domain (`router_init: data`, `router_data` in the recipe below): usable as "
                "composed; training them may still improve the routing.")
    return (f"A `{config.method}` Mixture-of-Experts over {config.num_experts} `{config.text_config.model_type}` "
            f"models, top-{config.num_experts_per_tok} routing. The routers are stored in this checkpoint with "
            f"their initial values (`{plan.recipe.router_init}`): train them before relying on the routing.")


def write_model_card(plan: CompositionPlan, path: Path, model_name: str) -> None:
    config = plan.config
    rows = []
    for index, model in enumerate(plan.models):
        role = "expert" if index in plan.expert_models else "base (shared weights)"
        if index in plan.expert_models and model.name == getattr(plan.recipe.base, "name", None):
            role = "base, routed as an expert"
        if config.method == "bts":
            role = "hub" if index == plan.reference else "expert stream (frozen)"
        hashes = "<br>".join(f"`{name}` sha256 `{digest}`" for name, digest in model.file_hashes.items())
        rows.append(f"| {model.name} | {role} | `{model.origin}` | {hashes} |")
    by_path = ("\nTools that take only a path load it with `trust_remote_code=True` when `moekit` is installed: the "
               "checkpoint's `auto_map` files only import it.\n" if plan.recipe.auto_map else "")
    text = card_front_matter(["moekit", "mixture-of-experts", config.method]) + f"""
# Composed with MixtureKit {VERSION}

{_what_it_is(plan)}

```python
# install MixtureKit: {install_instruction()}
import moekit  # registers the architecture with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_name}")
```
{by_path}

## Sources

| name | role | source | weight files |
| --- | --- | --- | --- |
{chr(10).join(rows)}

## Plan

```
{plan_summary(plan)}
```

## Recipe

```yaml
{plan.recipe.to_yaml().rstrip()}
```
"""
    path.write_text(text, encoding="utf-8")
