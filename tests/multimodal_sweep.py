"""Every image-text family the installed `transformers` builds, composed three ways and checked WITH AN IMAGE.

For each model type in `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`: a tiny random model and processor-free inputs
with an image (`multimodal_models.FAMILIES`), three dense models, then per method (`traditional`, `btx`, `bts`) one
outcome, as in `family_sweep`:
  passed   identical copies (bts: initial stitches) give the dense (hub) model's logits on text with an image; greedy
           generation from a prompt with an image with the cache equals it without; save -> load gives the same
           logits; the checkpoint also loads with AutoModelForCausalLM and answers text as the dense model does;
  refused  composing raised a `MixtureKitError`, whose first sentence is recorded as the reason;
  FAILED   anything else: the test fails on it.
The families `multimodal_models.FAMILIES` names have hand-made tiny configs and inputs; every other one goes through
its generic harness (configs shrunk as `family_sweep` does and the vision side too, the image fed as the family's
forward asks, the image-token count read from the model's own error). A family without a tiny model says whose limit
that is: "not built" (the harness's gap), "not runnable in transformers" (`TRANSFORMERS_LIMITS`), or "not runnable
here" (a library transformers needs for it is not installed).

`python tests/multimodal_sweep.py` prints the markdown table (`markdown_table`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transformers import AutoModelForImageTextToText

from family_sweep import MAX_PARAMETERS, METHODS, _close, _one_line, _reason
from multimodal_models import (FAMILIES, GENERIC_TOKEN_BASE, VOCAB, find_image_token_count, generic_family,
                               image_inputs, make_image_text_model)

# Logits of composed and dense models agree to float32 rounding of the routing's weighted sum; Qwen3.5's chunked
# linear attention (the reference kernel on CPU) reorders sums more.
ATOL = 1e-4
SPECIAL_TOKENS = list(range(GENERIC_TOKEN_BASE, VOCAB))  # image and other special tokens of every tiny model


@dataclass
class MultimodalResult:
    model_type: str
    built: str = ""  # the model class, or "not built: <why>"
    outcomes: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [f"{self.model_type} {method}: {outcome}" for method, outcome in self.outcomes.items()
                if outcome.startswith("FAILED")]


def image_text_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def recipe(method: str, sources: list[Path], **extra) -> dict:
    if method == "bts":
        return {"method": "bts", "base": {"name": "hub", "source": str(sources[0])},
                "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(sources[1:])], **extra}
    return {"method": method, "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(sources)],
            "num_experts_per_tok": 2, "seed": 7, **extra}


def greedy(model, inputs: dict, use_cache: bool) -> torch.Tensor:
    """Four greedy tokens, never a special one (an image token generated would be an image without pixels)."""
    return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=use_cache,
                          pad_token_id=0, suppress_tokens=SPECIAL_TOKENS)


_DENSE_CACHE_AGREES: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def dense_cache_agrees(model, inputs: dict) -> bool:
    """Whether the dense model's own cached greedy generation equals its uncached one (once per model: every method
    compares against it)."""
    if model not in _DENSE_CACHE_AGREES:
        _DENSE_CACHE_AGREES[model] = torch.equal(greedy(model, inputs, True), greedy(model, inputs, False))
    return _DENSE_CACHE_AGREES[model]


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def check_method(method: str, model_type: str, models: list[torch.nn.Module], folders: list[Path], root: Path) -> str:
    """The outcome of one method on one image-text family: passed, refused: <reason>, or FAILED: <what>."""
    from transformers import AutoModelForCausalLM

    from moekit import MixtureKitError, compose

    inputs = image_inputs(model_type, models[0].config)
    text = {"input_ids": inputs["input_ids"][:, :3]}  # the text before the image
    try:
        reference_sources = folders if method == "bts" else [folders[0]] * len(folders)
        reference = compose(recipe(method, reference_sources), root / f"{method}-reference", progress=False)
        mixed = compose(recipe(method, folders), root / f"{method}-mixed", progress=False)
    except MixtureKitError as error:
        return "refused: " + _reason(error)
    except Exception as error:  # noqa: BLE001  (the sweep reports it)
        return "FAILED: composing raised " + _one_line(error)
    what = "initial stitches" if method == "bts" else "identical copies"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            composed = AutoModelForImageTextToText.from_pretrained(reference).eval()
            if not _close(logits(composed, inputs), logits(models[0], inputs), atol=ATOL):
                return f"FAILED: {what} differ from the dense logits with an image"
            as_text_model = AutoModelForCausalLM.from_pretrained(reference).eval()
            if not _close(logits(as_text_model, text), logits(models[0], text), atol=ATOL):
                return f"FAILED: {what}, loaded with AutoModelForCausalLM, differ from the dense logits on text"
            composed = AutoModelForImageTextToText.from_pretrained(mixed).eval()
            if method == "bts":
                with torch.no_grad():
                    for name, parameter in composed.named_parameters():
                        if "stitches" in name:
                            parameter.add_(0.1 * torch.randn_like(parameter))
            with torch.no_grad():
                dense_agrees = dense_cache_agrees(models[0], inputs)
                cached, uncached = greedy(composed, inputs, True), greedy(composed, inputs, False)
            if dense_agrees and not torch.equal(cached, uncached):
                return "FAILED: greedy generation from an image with the cache differs from without"
            before = logits(composed, inputs)
            composed.save_pretrained(root / f"{method}-saved")
            reloaded = AutoModelForImageTextToText.from_pretrained(root / f"{method}-saved").eval()
            after = logits(reloaded, inputs)
            if not _close(after, before, atol=1e-5):  # as family_sweep: exact up to kernel reordering
                return f"FAILED: save -> load changed the logits by {(after - before).abs().max().item():.1e}"
    except MixtureKitError as error:
        return "refused on load: " + _reason(error)
    except Exception as error:  # noqa: BLE001
        return "FAILED: the composed model raised " + _one_line(error)
    return "passed" if dense_agrees else "passed (its dense model's cached generation differs from uncached)"


def build_family(model_type: str, root: Path, count: int = 3) -> tuple[list[torch.nn.Module], list[Path]]:
    """Three tiny dense models of the family, saved under `root/model_type`; raises where none can be built."""
    config, _ = FAMILIES[model_type]() if model_type in FAMILIES else generic_family(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the shrunk config still has {size:,} parameters (a size field this sweep does not know)")
    models = [make_image_text_model(config, seed) for seed in range(count)]
    if model_type not in FAMILIES:
        find_image_token_count(model_type, models[0])
    if not torch.isfinite(logits(models[0], image_inputs(model_type, config))).all():
        raise ValueError("the tiny dense model's logits with an image are not finite")
    folders = [root / model_type / f"dense{index}" for index in range(count)]
    for model, folder in zip(models, folders):
        model.save_pretrained(folder)
    return models, folders


# Families whose tiny dense model transformers itself cannot run with the harness's well-formed inputs, with what its
# own code does (read in each family's modeling file): not a gap of this harness. Any other family that fails to build
# is listed as "not built", the harness's.
TRANSFORMERS_LIMITS: dict[str, str] = {}
NOT_BUILT, NOT_RUNNABLE_HERE, NOT_RUNNABLE = "not built: ", "not runnable here: ", "not runnable in transformers: "


def not_built(model_type: str, error: BaseException) -> str:
    """Why a family has no tiny model: a library transformers needs and this environment lacks, a limit of
    transformers itself (`TRANSFORMERS_LIMITS`), or else the harness's own gap."""
    if isinstance(error, ImportError):
        return NOT_RUNNABLE_HERE + " ".join(str(error).split()).split(". ")[0]
    if model_type in TRANSFORMERS_LIMITS:
        return NOT_RUNNABLE + TRANSFORMERS_LIMITS[model_type]
    return NOT_BUILT + _one_line(error)


def sweep_family(model_type: str, root: Path) -> MultimodalResult:
    result = MultimodalResult(model_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models, folders = build_family(model_type, root)
        result.built = type(models[0]).__name__
    except Exception as error:  # noqa: BLE001  (recorded: no tiny model of this family)
        result.built = not_built(model_type, error)
        return result
    for method in METHODS:
        try:
            result.outcomes[method] = check_method(method, model_type, models, folders, root / model_type)
        except Exception:  # noqa: BLE001
            result.outcomes[method] = "FAILED: " + traceback.format_exc(limit=1).splitlines()[-1]
    shutil.rmtree(root / model_type, ignore_errors=True)
    return result


def sweep(root: Path, model_types: list[str] | None = None) -> list[MultimodalResult]:
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return [sweep_family(model_type, root) for model_type in model_types or image_text_types()]
    finally:
        logging.set_verbosity(verbosity)


def markdown_table(results: list[MultimodalResult]) -> str:
    """The README's table: one row per image-text family, a column per method, and a count of passed families."""
    passed = sum(1 for r in results if r.outcomes and all(o.startswith("passed") for o in r.outcomes.values()))
    refused = sum(1 for r in results if r.outcomes and all(o.startswith(("passed", "refused")) for o in r.outcomes.values())
                  and not all(o.startswith("passed") for o in r.outcomes.values()))
    built = sum(1 for r in results if r.outcomes)
    gaps = sum(1 for r in results if r.built.startswith(NOT_BUILT))
    lines = [f"{passed} of {len(results)} image-text families pass all three methods with an image in the input, "
             f"{refused} more are refused by some or all methods and pass the others ({built} have a tiny model in the sweep; {gaps} are "
             "not built by its harness, the others cannot run in transformers or this environment).", "",
             "| model type | class | traditional | btx | bts |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        cells = [r.outcomes.get(m, "").replace("|", "/").replace("`", "") for m in METHODS]
        if not r.outcomes:
            lines.append(f"| {r.model_type} | — | {r.built.replace('|', '/')} | | |")
        else:
            lines.append(f"| {r.model_type} | {r.built} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        print(markdown_table(sweep(Path(root), sys.argv[1:] or None)))


if __name__ == "__main__":
    main()
