"""LoRA on composed models with PEFT: default targets per method, with routers and BTS stitches trained in full.

What PEFT 0.21 can wrap in a composed model:

- attention projections and other plain `nn.Linear`s of the blocks: ordinary LoRA (`target_modules`);
- the stacked experts of `traditional` (`mlp.experts.gate_up_proj [E, 2f, d]`, `mlp.experts.down_proj [E, d, f]`) and
  the expert weights of `btx` (`RoutedLinear.weight [E, out, in]`): LoRA on the 3D parameter with `target_parameters`
  (PEFT's `ParamWrapper`, one rank-r update per expert, added to the weight for the duration of each forward). It
  needs `lora_dropout=0` and, for the update, builds a tensor of the whole expert stack per forward;
- routers and stitches: trained in full and saved with the adapter through `modules_to_save`;
- a shared expert (`shared_expert: base`): its Linears are plain ones, adapted by default like the experts; its
  sigmoid gate (`shared_expert_gate`) trains in full with the routers.

One combination PEFT refuses: a `btx` router lives inside its `RoutedLinear`, and PEFT will not put a
`modules_to_save` module under a `ParamWrapper` ("You are trying to target a module with ModulesToSaveWrapper that is
a child of ParamWrapper"). So `btx` trains its routers in full *or* puts LoRA on its routed expert weights: by default
the routers train and the routed Linears are left out; `train_routers=False` freezes the routers and adapts the
experts instead.

PEFT copies each `modules_to_save` module with `copy.deepcopy`, which also copies the router's reference to the
model's logits recorder; the copy would then record into a private recorder and the load-balancing loss would vanish.
`apply_lora` and `load_lora` point every router back at the model's recorder: use them rather than `get_peft_model`
and `PeftModel.from_pretrained` directly when the aux loss matters (logits are the same either way).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import TrainingError

from ..runtime.base_model.architecture import LINEAR_TYPES, decoder_layers, resolve_names
from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.routed.moe_block import SparseMoeBlock
from ..runtime.routed.routed_linear import RoutedLinear
from ..runtime.routed.routing import Router
from ..runtime.routed.shared_expert import SHARED_EXPERT, SharedExpertGate
from .composed import composed_model
from .upstream_warnings import upstream_checkpointing_renames_silenced

EXPERTS = "mlp.experts"  # the target name of a traditional block's stacked experts
Targets = dict[str, dict[int, tuple[str, list[str]]]]  # block-relative name -> block index -> (kind, adapted names)


def _block_targets(model: MixtureKitForCausalLM) -> tuple[str, Targets]:
    """The hub's block list name and, for each LoRA-able name relative to a block, per block index the kind
    (`linear`, `routed`, `experts`, `shared`: a shared expert's Linear) and the parameters it adapts."""
    layers_name, blocks = decoder_layers(model.dense_model, model.config.text_config)
    targets: Targets = {}
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, SharedExpertGate):
                continue  # trained in full with the routers (`_modules_to_save`)
            if isinstance(module, LINEAR_TYPES) and f".{SHARED_EXPERT}." in f".{name}.":
                targets.setdefault(name, {})[index] = ("shared", [name])
            elif isinstance(module, RoutedLinear):
                targets.setdefault(name, {})[index] = ("routed", [f"{name}.weight"])
            elif isinstance(module, SparseMoeBlock):
                experts = module.experts
                targets.setdefault(EXPERTS, {})[index] = (
                    "experts", [f"{name}.experts.{experts.up_name}", f"{name}.experts.down_proj"])
            elif isinstance(module, LINEAR_TYPES):
                targets.setdefault(name, {})[index] = ("linear", [name])
    return layers_name, targets


def _kind(per_block: dict[int, tuple[str, list[str]]]) -> set[str]:
    return {kind for kind, _ in per_block.values()}


def _resolve(requested: list[str], valid: list[str]) -> list[str]:
    """Full block-relative names for `requested` entries (a full name or a unique suffix such as `q_proj`)."""

    def refuse(entry: str, candidates: list[str]) -> TrainingError:
        why = f"is ambiguous ({', '.join(candidates)})" if candidates else "does not exist in the model"
        return TrainingError(
            f"LoRA target module '{entry}' {why}; valid names (relative to a decoder block): {', '.join(valid)}"
        )

    return resolve_names(requested, valid, refuse)


def _module_regex(layers_name: str, linears: list[tuple[str, list[int]]], num_blocks: int) -> str:
    """One regular expression for the chosen Linears of the hub's blocks: PEFT full-matches it against module names,
    so the bts expert streams (`streams.<name>.layers...`) and the routed blocks' other modules never match."""
    parts = []
    for name, indices in linears:
        index_pattern = r"\d+" if len(indices) == num_blocks else "(?:" + "|".join(map(str, indices)) + ")"
        parts.append(rf"{re.escape(layers_name)}\.{index_pattern}\.{re.escape(name)}")
    return "(?:" + "|".join(parts) + ")"


def lora_config_for(
    model: nn.Module,
    target_modules: list[str] | None = None,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    train_routers: bool = True,
    train_stitches: bool = True,
    **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` for a composed model.

    Default targets: the attention projections (every Linear of a block outside its FFN; for bts the hub's blocks
    only, the expert streams stay frozen), plus the stacked experts of `traditional` and, with `train_routers=False`,
    the routed expert weights of `btx` (see the module docstring for why not both). Routers (`train_routers`) and
    bts stitches (`train_stitches`) are trained in full via `modules_to_save`. `target_modules` takes names relative
    to a decoder block or unique suffixes (`q_proj`, `self_attn.o_proj`, `mlp.experts`, `mlp.up_proj`); a name that is
    not in the model is a `TrainingError` that lists the valid ones.
    """
    model = composed_model(model)
    method = model.config.method
    layers_name, targets = _block_targets(model)
    num_blocks = len(decoder_layers(model.dense_model, model.config.text_config)[1])
    valid = list(targets)
    if target_modules is None:
        chosen = [n for n in valid if _kind(targets[n]) == {"linear"} and not n.startswith("mlp.")]
        chosen += [n for n in valid if _kind(targets[n]) & {"experts", "shared"}]
        if method == "btx" and not train_routers:
            chosen += [n for n in valid if "routed" in _kind(targets[n])]
    else:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        chosen = _resolve(list(target_modules), valid)

    linear_names, parameter_names = [], []
    for name in chosen:
        kinds = _kind(targets[name])
        if kinds & {"routed", "experts"}:
            if "routed" in kinds and train_routers:
                raise TrainingError(
                    f"'{name}' is a routed linear: PEFT can put LoRA on its expert weights (target_parameters) but "
                    "then refuses to keep its router trainable (modules_to_save under a ParamWrapper). Pass "
                    "train_routers=False to adapt the experts with frozen routers, or leave it out of target_modules."
                )
            if dropout:
                raise TrainingError(
                    f"LoRA on the stacked expert weights of '{name}' (PEFT ParamWrapper) needs dropout=0, got {dropout}"
                )
            for index, (kind, params) in sorted(targets[name].items()):
                if kind != "linear":
                    parameter_names += [f"{layers_name}.{index}.{p}" for p in params]
        # A name that stays a plain Linear in blocks without routers (partial router_layers_index) gets plain LoRA.
        linear_blocks = sorted(i for i, (kind, _) in targets[name].items() if kind in ("linear", "shared"))
        if linear_blocks:
            linear_names.append((name, linear_blocks))

    regex = _module_regex(layers_name, linear_names, num_blocks) if linear_names else None
    if regex is None and not parameter_names:
        raise TrainingError(f"no LoRA targets chosen; valid names (relative to a decoder block): {', '.join(valid)}")

    modules_to_save = _modules_to_save(model, train_routers, train_stitches)
    conv1d = any(isinstance(m, LINEAR_TYPES) and not isinstance(m, nn.Linear) for n, m in model.named_modules()
                 if regex is not None and re.fullmatch(regex, n))
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, target_parameters=parameter_names or None,
        modules_to_save=modules_to_save or None, fan_in_fan_out=conv1d, task_type="CAUSAL_LM", **lora_kwargs,
    )


def _modules_to_save(model: MixtureKitForCausalLM, train_routers: bool, train_stitches: bool) -> list[str]:
    """Suffixes that PEFT (`name.endswith(suffix)`) matches to exactly the routers (with any shared-expert gates) and
    the stitches, checked here."""
    wanted: dict[str, nn.Module] = {}
    suffixes: list[str] = []
    if train_routers:
        layers_name, _ = decoder_layers(model.dense_model, model.config.text_config)
        gates = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedExpertGate)]
        for name, router in [*model.routers(), *gates]:
            wanted[name] = router
            relative = name[len(layers_name) + 1:].split(".", 1)[1]  # strip the block index
            if relative not in suffixes:
                suffixes.append(relative)
    if train_stitches and model.config.method == "bts":
        for index, stitch in enumerate(model.stitches):
            wanted[f"stitches.{index}"] = stitch
            suffixes.append(f"stitches.{index}")
    matched = {n for n, _ in model.named_modules() if any(n.endswith(s) for s in suffixes)}
    if matched != set(wanted):
        raise TrainingError(
            f"modules_to_save {suffixes} would match {sorted(matched ^ set(wanted))} wrongly; please report this model"
        )
    return suffixes


def share_router_recorder(model: nn.Module) -> None:
    """Point every router (PEFT's copies included) at the composed model's recorder, so the aux loss sees them."""
    composed = composed_model(model)
    for module in composed.modules():
        if isinstance(module, Router):
            object.__setattr__(module, "recorder", composed.router_recorder)


def apply_lora(model: nn.Module, config: LoraConfig | None = None, **config_kwargs: Any) -> PeftModel:
    """`get_peft_model` with `lora_config_for(model, **config_kwargs)` by default, routers kept on the aux loss."""
    with upstream_checkpointing_renames_silenced():
        peft_model = get_peft_model(model, config or lora_config_for(model, **config_kwargs))
    share_router_recorder(peft_model)
    return peft_model


def load_lora(model: nn.Module, adapter: str | Path, is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained` on a composed model, routers kept on the aux loss."""
    composed_model(model)
    with upstream_checkpointing_renames_silenced():
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
    share_router_recorder(peft_model)
    return peft_model
