"""A training-free router: every router's rows fitted from a small sample of each expert's domain, with no gradient
step on the model (the `data` fit of `training.router_init`: hidden states at each router's input, taken with every
expert mixed uniformly, then a bias-free softmax classifier per router telling the domains apart). Used by compose
(`router_init: data` with `router_data` in the recipe) and on a composed checkpoint (`fit_routers_from_data`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RecipeError
from ..runtime.assembly.config import MixtureKitConfig, require_composed
from .prune import read_texts
from .remove import EditError
from .rewrite import edited_checkpoint

DEFAULT_TEXTS = 256  # texts per expert: a few hundred sequences, as FlexOlmo's domain embeddings use


def texts_by_expert(data: dict[str, str | Path | list[str] | torch.Tensor], names: list[str],
                    limit: int = DEFAULT_TEXTS) -> dict[str, list[str] | torch.Tensor]:
    """Each expert's sample (a file, texts or token ids), its first `limit` texts; every expert needs one."""
    missing = [n for n in names if n not in data]
    unknown = [n for n in data if n not in names]
    if missing or unknown:
        raise RecipeError(f"router_data needs a sample for every expert and no other: "
                          f"{f'missing {missing}' if missing else ''}{'; ' if missing and unknown else ''}"
                          f"{f'unknown {unknown}' if unknown else ''} (experts: {', '.join(names)})")
    samples = {}
    for name in names:
        sample = data[name]
        sample = read_texts(sample) if isinstance(sample, (str, Path)) else sample
        if len(sample) == 0:
            raise RecipeError(f"router_data for expert '{name}' has no texts")
        samples[name] = sample[:limit]
    return samples


def fitted_router_weights(model, tokenizer, samples: dict[str, list[str] | torch.Tensor],
                          progress: bool = False) -> dict[str, torch.Tensor]:
    """Every router's fitted rows by tensor name (the model's routers are set to them too)."""
    from ..training.router_init import initialize_routers

    if model.config.method == "bts":
        raise RecipeError("router_init: data fits routers, and a bts composition has none (its stitches start as "
                          "the identity on the hub); use random or zeros, or train the stitches")
    initialize_routers(model, tokenizer, "data", samples, progress=progress)
    return {f"{name}.weight": router.weight.detach().cpu().clone() for name, router in model.routers()}


def fit_routers_from_data(checkpoint: str | Path, data: dict[str, str | Path | list[str] | torch.Tensor],
                          output: str | Path, overwrite: bool = False, progress: bool = False,
                          record: bool = True, limit: int = DEFAULT_TEXTS, device: str | None = None) -> Path:
    """Write `checkpoint` with every router fitted from `data` (expert name: sample) to `output`; `record` adds the
    fit to the config's `edits` (compose does not: it is how the checkpoint was made). `device`: where the model
    runs over the samples (the fit itself runs on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_composed(checkpoint, "only a composition has routers to fit", EditError)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    samples = texts_by_expert(data, list(config.expert_names), limit)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    if device is not None:
        model.to(device)
    needs_tokenizer = any(not isinstance(s, torch.Tensor) for s in samples.values())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint) if needs_tokenizer else None
    weights = fitted_router_weights(model, tokenizer, samples, progress)
    del model
    edit = {"operation": "fit_routers", "experts": list(config.expert_names), "by": "data",
            "texts": {n: len(s) for n, s in samples.items()}} if record else None
    return edited_checkpoint(checkpoint, output, list(range(config.num_experts)), edit, overwrite=overwrite,
                             progress=progress, replaced=weights)
