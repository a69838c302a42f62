"""The typed, validated description of what to compose."""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RecipeError, did_you_mean
from .legacy import is_legacy_recipe, translate_legacy_recipe

Method = Literal["traditional", "btx", "bts"]
DEFAULT_BIAS_RATE = 0.001  # balance: bias: DeepSeek-V3's bias update speed u
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Numeric fields: YAML reads `yes`/`true` as a bool, which pydantic would silently take as 1.
_NUMERIC_FIELDS = (
    "num_experts_per_tok", "router_layers_index", "router_init_std", "alpha", "shard_size", "seed", "stitch_freq",
    "router_data_texts",
    "stitch_layers_index", "stitch_dropout", "load_floor", "alpha_max", "router_z_loss_coef", "balance_bias_rate",
)


def parse_size(value: int | str) -> int:
    """Parse a byte size such as ``2GB``, ``500MiB`` or ``1048576``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        number = float(match.group(1)) * _SIZE_UNITS[unit] if match and unit in _SIZE_UNITS else math.nan
        if not math.isfinite(number):  # not a size, or too many digits for a float (int(inf) would overflow)
            raise ValueError(f"'{value}' is not a size; write bytes as an integer or e.g. '500MB', '2GB', '1GiB'")
        size = int(number)
    if size < 1:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    """One source model: a name for it and where to read it from."""

    name: str = Field(description="Short name, used in the checkpoint and reports.")
    source: str = Field(
        description="Local folder, .gguf file, Hugging Face Hub id, or a PEFT LoRA adapter folder of `base`.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    gguf_file: str | None = Field(default=None, description="GGUF file inside `source` when it is a folder.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _NAME_PATTERN.match(name):
            raise ValueError(
                f"'{name}' is not a valid name: use letters, digits, '_' and '-', starting with a letter or digit "
                "(names become module and tensor names, so no '.' or '/')"
            )
        return name

    @field_validator("source")
    @classmethod
    def _nonempty_source(cls, source: str) -> str:
        if not source.strip():
            raise ValueError("source is empty: give a local folder, a .gguf file or a Hub id such as 'org/model'")
        return source


class Recipe(_Strict):
    """What to build: the method, the sources, the routing and the output.

    Read one with :func:`load_recipe` (YAML file, dict, or the original MixtureKit ``build_moe`` dict).
    """

    method: Method = Field(description="traditional | btx | bts")
    experts: list[ModelSource] = Field(min_length=1, description="The models whose weights become the experts.")
    base: ModelSource | None = Field(default=None, description="The seed model the experts were branched from.")
    base_as_expert: bool = Field(
        default=False, description="Route to the base as one more expert (first), besides its use for shared weights."
    )
    shared_weights: Literal["average", "base"] = Field(
        default="average",
        description="Non-expert weights: the float32 mean over the experts, or copied from `base`.",
    )
    shared_expert: Literal["base"] | None = Field(default=None, description=(
        "traditional/btx: 'base' keeps the base's FFN (btx: each routed projection) always on beside the routed "
        "experts, as Qwen2-MoE and DeepSeek-MoE do; the block gives ½·routed + s·shared, s = ½ or a sigmoid gate."))
    shared_expert_gate: bool = Field(default=False, description=(
        "With shared_expert: weigh it per token by sigmoid(g·x), g starting at zero (s = ½); false: s = ½ always."))
    vision: Literal["keep", "drop"] = Field(default="keep", description=(
        "Image-text experts (Gemma 3, LLaVA, Qwen3-VL, ...): keep writes an image-text model (the decoder composed, "
        "the vision tower and projector treated as the other non-routed weights, the processor beside it); drop "
        "writes a text-only composition of the language model. Text models: no effect."))
    num_experts_per_tok: int | None = Field(default=None, description="k of top-k; default min(2, experts).")
    router_layers: list[str] | None = Field(
        default=None, description="btx: the Linear layers of a block to route, e.g. mlp.gate_proj; default: the MLP's."
    )
    router_layers_index: list[int] | None = Field(
        default=None, description="Blocks that get routers (0-based); default or []: every block."
    )
    # Two steps set routers, each with the setting it can act on: composing reads no data (the plan comes from configs
    # and headers alone), so the recipe chooses random or zero routers; the training config's `router_init`
    # (keep|data|hidden) fits them from data before the router stage, where data exists.
    router_init: Literal["random", "zeros", "data"] = Field(default="random", description=(
        "Initial router weights written by compose; data: fitted from `router_data` (a sample of each expert's "
        "domain) without training. The training config's router_init (data, hidden) can refit them before training."))
    router_data: dict[str, str] | None = Field(default=None, description=(
        "router_init data: for every expert, a file of texts from its domain (.txt, one per line, or .jsonl with a "
        "text field); a few hundred sequences are enough."))
    router_data_texts: int | None = Field(default=None, ge=1, description=(
        "router_init data: texts read per expert at most (default 256)."))
    router_init_std: float = Field(default=0.02, gt=0, allow_inf_nan=False, description="Std of the random router initialisation.")
    alpha: float = Field(default=0.01, ge=0, allow_inf_nan=False, description="Load-balancing loss coefficient.")
    alpha_mode: Literal["fixed", "auto"] = Field(
        default="fixed", description="auto: alpha grows x1.5 a training step while an expert's share of a router's "
        "slots is under load_floor (up to alpha_max), and decays back to alpha after.")
    load_floor: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False,
                                     description="alpha_mode auto: the share that counts as starving; default 0.5/E.")
    alpha_max: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="alpha_mode auto: the ceiling.")
    balance: Literal["loss", "bias"] = Field(
        default="loss", description="loss: the Switch loss (alpha) alone balances the experts. bias: loss-free "
        "balancing (DeepSeek-V3), a per-expert bias added to the router logits for the choice only, moved by "
        "balance_bias_rate after each training step towards equal load; the Switch loss still applies where alpha > 0.")
    balance_bias_rate: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="balance: bias: how far each expert's bias moves a "
        f"training step (DeepSeek-V3's update speed u); default {DEFAULT_BIAS_RATE}.")
    router_z_loss_coef: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                      description="ST-MoE router z-loss coefficient (keeps router logits small).")
    experts_backend: Literal["auto", "loop", "grouped_mm"] = Field(
        default="auto", description="How stacked experts multiply: grouped_mm where it applies, else a loop.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Dtype of the written tensors; auto keeps the first expert's."
    )
    output: str | None = Field(default=None, description="Output folder.")
    shard_size: int | str = Field(default="2GB", description="Largest shard file, e.g. 2GB or 500MiB.")
    seed: int = Field(default=0, description="Seed for new weights: the same recipe gives the same bytes.")
    auto_map: bool = Field(
        default=True, description="Write an auto_map and two loader files that import the installed moekit, so "
        "tools that take only a path load the checkpoint with trust_remote_code=True."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Read pickle (.bin/.pt) sources, with torch.load(weights_only=True), converted once to safetensors.",
    )
    # BTS (Branch-Train-Stitch) fields.
    hub: str | None = Field(default=None, description="bts: name of the model that is the hub (default: base).")
    stitch_freq: int | None = Field(default=None, description="bts: a stitch every this many blocks.")
    stitch_layers_index: list[int] | None = Field(default=None, description="bts: explicit stitch blocks.")
    stitch_dropout: float = Field(default=0.0, ge=0, lt=1, description="bts: dropout on stitch gates in training.")

    @field_validator(*_NUMERIC_FIELDS, mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise ValueError(f"expected a number, got the boolean {value!r} (in YAML, yes/no/on/off are booleans)")
        return value

    @field_validator("shard_size")
    @classmethod
    def _valid_size(cls, value: int | str) -> int | str:
        parse_size(value)
        return value

    @field_validator("stitch_freq")
    @classmethod
    def _positive_freq(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"stitch_freq must be at least 1 (a stitch every N blocks), got {value}")
        return value

    @field_validator("router_layers_index", "stitch_layers_index")
    @classmethod
    def _nonnegative_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            bad = [i for i in value if i < 0]
            if bad:
                raise ValueError(f"block indices are 0-based and non-negative, got {bad}")
            if len(set(value)) != len(value):
                raise ValueError(f"block indices repeat: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        names = [m.name for m in self.all_sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, but {duplicates} appear more than once")
        if self.shared_weights == "base" and self.base is None:
            raise ValueError("shared_weights: base needs a `base` model; add one or use shared_weights: average")
        if self.base_as_expert and self.base is None:
            raise ValueError("base_as_expert: true needs a `base` model")
        if self.shared_expert is not None and self.method == "bts":
            raise ValueError("shared_expert applies to methods traditional and btx, not bts (the bts hub already runs "
                             "on every token beside the expert streams); remove shared_expert or change the method")
        if self.shared_expert == "base" and self.base is None:
            raise ValueError("shared_expert: base needs a `base` model, whose FFN becomes the shared expert: add "
                             "`base: {name: ..., source: ...}` (the model the experts were branched from) or remove "
                             "shared_expert")
        if self.shared_expert_gate and self.shared_expert is None:
            raise ValueError("shared_expert_gate: true needs a shared expert; add shared_expert: base or remove "
                             "shared_expert_gate")
        num_experts = len(self.expert_sources)
        if self.method == "bts" and len(self.all_sources) < 2:
            raise ValueError("bts needs a hub and at least one expert: give `base` (the hub) and `experts`, or 2+ experts")
        if self.method != "bts":
            if num_experts < 2:
                raise ValueError(f"a mixture needs at least 2 experts, got {num_experts}")
            k = self.num_experts_per_tok
            if k is not None and not 1 <= k <= num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be between 1 and the number of experts ({num_experts}), got {k}"
                )
        if self.router_layers is not None and self.method != "btx":
            if self.router_layers:
                raise ValueError(f"router_layers applies to method btx only, not {self.method}")
        if self.router_layers is not None and self.method == "btx" and not self.router_layers:
            raise ValueError("router_layers is empty: name at least one Linear of the block, e.g. mlp.up_proj")
        if self.method == "bts" and self.balance == "bias":
            raise ValueError("balance: bias applies to the routed methods (traditional, btx); bts has no routers to "
                             "bias (its stitches are gates): use balance: loss")
        if self.balance_bias_rate is not None and self.balance != "bias":
            raise ValueError(f"balance_bias_rate applies to balance: bias only, but balance is '{self.balance}': set "
                             "balance: bias, or remove balance_bias_rate")
        if self.router_init == "data" and self.method == "bts":
            raise ValueError("router_init: data fits routers, and bts has none (its stitches start as the identity on "
                             "the hub); use random or zeros")
        if self.router_init == "data":
            experts = [m.name for m in self.expert_sources]
            given = sorted(self.router_data or {})
            if sorted(experts) != given:
                raise ValueError(f"router_init: data needs router_data with a file for every expert ({experts}), got "
                                 f"{given or 'none'}")
        elif self.router_data:
            raise ValueError("router_data is read only with router_init: data; set it, or remove router_data")
        if self.hub is not None and self.hub not in names:
            raise ValueError(f"hub '{self.hub}' is not one of the models: {names}")
        return self

    @property
    def expert_sources(self) -> list[ModelSource]:
        """The routed experts, in order: the base first when `base_as_expert`."""
        return ([self.base] if self.base_as_expert and self.base is not None else []) + list(self.experts)

    @property
    def hub_name(self) -> str:
        """bts: the hub's name: `hub`, else the base, else the first expert."""
        if self.hub is not None:
            return self.hub
        return self.base.name if self.base is not None else self.experts[0].name

    @property
    def all_sources(self) -> list[ModelSource]:
        """Every model the recipe reads, the base first."""
        return ([self.base] if self.base is not None else []) + list(self.experts)

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok if self.num_experts_per_tok is not None else min(2, len(self.expert_sources))

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`load_recipe` reads back into an equal recipe."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_output(self, output: str | Path | None) -> "Recipe":
        return self if output is None else self.model_copy(update={"output": str(output)})


_SHOW = reprlib.Repr()  # a bounded repr of bad values for messages (keyword arguments need Python 3.12)
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 3, 60, 60, 6, 6


def explain_validation_error(error: ValidationError, what: str = "recipe",
                             fields_of: Callable[[tuple], list[str]] | None = None) -> str:
    """pydantic's errors as one line each, naming the field, with a "did you mean" for unknown fields and for
    values outside a fixed set. `fields_of(location)` lists the valid fields beside an unknown one."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or what
        if item["type"] == "extra_forbidden":
            valid = fields_of(item["loc"]) if fields_of else []
            field = str(item["loc"][-1])
            lines.append(
                f"{location}: unknown field{did_you_mean(field, valid)}; valid fields are {', '.join(valid)}"
            )
        elif item["type"] == "literal_error":
            choices = re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", "")))
            hint = did_you_mean(str(item["input"]), choices) if isinstance(item["input"], str) else ""
            lines.append(f"{location}: {item['msg']} (got {_SHOW.repr(item['input'])}){hint}")
        elif item["type"] == "too_short":
            lines.append(f"{location}: needs at least {item['ctx']['min_length']} item(s), got "
                         f"{_SHOW.repr(item['input'])}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            if item["loc"] and item["type"] not in ("value_error", "missing"):  # a type or range error: show the value
                message += f" (got {_SHOW.repr(item['input'])})"
            lines.append(f"{location}: {message}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def _recipe_fields(location: tuple) -> list[str]:
    return sorted((Recipe if len(location) == 1 else ModelSource).model_fields)


def load_recipe(source: "Recipe | dict[str, Any] | str | Path") -> Recipe:
    """Read a recipe from a YAML file, a dict (ours or the original MixtureKit's), or pass one through."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            kind = "folder" if path.is_dir() else "file" if path.is_file() else None
            text = path.read_text(encoding="utf-8") if kind == "file" else ""
        except OSError as error:  # a name too long for the file system, a file that cannot be read...
            raise RecipeError(
                f"cannot read recipe file '{path}' ({error}); give a readable YAML file or a dict"
            ) from None
        except UnicodeDecodeError as error:
            raise RecipeError(f"recipe file '{path}' is not UTF-8 text ({error}); save it as UTF-8 YAML") from None
        if kind != "file":
            what = "is a folder" if kind == "folder" else "does not exist"
            raise RecipeError(f"recipe file '{path}' {what} (give a YAML file or a dict)")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise RecipeError(
                f"recipe file '{path}' is not valid YAML; fix the syntax at the line and column shown: {error}"
            ) from None
        except (ValueError, TypeError) as error:  # PyYAML cannot build a typed value: `2020-99-99`, `!!float abc`
            raise RecipeError(
                f"recipe file '{path}' holds a value YAML cannot read ({error}); quote it to make it a string"
            ) from None
        except RecursionError:
            raise RecipeError(
                f"recipe file '{path}' is nested too deeply; a recipe is a flat mapping of fields"
            ) from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file '{path}' must hold a mapping of fields, got {type(data).__name__}")
    elif isinstance(source, dict):
        data = source
    else:
        raise RecipeError(f"a recipe is a YAML path, a dict or a Recipe, not {type(source).__name__}")
    if not all(isinstance(key, str) for key in data):
        raise RecipeError(f"recipe keys must be strings, got {[k for k in data if not isinstance(k, str)]}")
    if is_legacy_recipe(data):
        data = translate_legacy_recipe(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(explain_validation_error(error, "recipe", _recipe_fields)) from None
