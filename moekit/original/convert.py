"""`moekit convert-original`: bring a checkpoint of the original MixtureKit (the registry's `mixturekit`, import name
`MixtureKit`, release 1.1.1) over to this format, keeping its trained routers and stitches.

Its `build_moe` writes the base model's flat config plus its own fields (`moe_method`, `base_model_class`,
`expert_names`, ...), a copied `modeling_<model_type>.py` loaded with `trust_remote_code`, and tensors named after
its modules. Nothing of that code runs here: the config and the tensor names alone say where each of our tensors
comes from (a plan, as compose has), and the tensors are streamed into our shards one at a time.

| theirs | ours |
| --- | --- |
| traditional `L.mlp.experts.I.{gate,up,down}_proj.weight`, router `L.mlp.gate.weight` | `L.mlp.experts.gate_up_proj [E, 2f, d]`, `down_proj`, router `L.mlp.gate.weight` |
| btx `L.<proj>.experts.expert_I.{weight,bias}`, router `L.<proj>.gate.weight` | `L.<proj>.{weight,bias} [E, ...]`, router `L.<proj>.router.weight` |
| bts hub `model.*`, experts `model.expert_layers.L.I.*`, `model.expert_embed_tokens.I.*` | hub `model.*`, streams `streams.<name>.{layers.L,embed_tokens}.*` |
| bts stitch `model.layers.L.stitches.w_gate.J`, `w_proj.I` | `stitches.K.{gate,gates.I,projections.I}` at scale 1 (the paper's form) |

Where the two models compute different functions from the same weights, the conversion says so (`Conversion.notes`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from ..distribution import OTHER_DISTRIBUTION, OTHER_IMPORT_NAME, install_instruction
from ..errors import CheckpointError, SourceError, UnsupportedArchitectureError
from ..runtime.assembly.config import MixtureKitConfig
from ..runtime.assembly.loader_files import AUTO_MAP
from ..sources.checkpoint_folder import card_front_matter, check_output_folder, copy_tokenizer_files, staged_output, write_sharded
from ..sources.resolve import weight_files
from ..sources.safetensors_io import CheckpointReader, TensorSlot
from .source_plan import ROUTER_INIT_STD, SourcePlan
from .stitches import original_stitch_directions, original_stitch_points, stitch_sources, stream_sources

METHODS = ("traditional", "btx", "bts")
# The fields the original adds to the base model's config; the rest is the base model's own config.
ORIGINAL_FIELDS = {
    "model_type", "auto_map", "architectures", "base_model_class", "moe_method", "num_experts", "expert_names",
    "expert_model_ids", "expert_is_local", "num_experts_per_tok", "alpha", "router_layers", "router_layers_index",
    "stitch_freq", "stitch_layers_index", "mixturekit_legacy_rope", "_name_or_path", "transformers_version",
}
SHARD_BYTES = 2 * 10**9  # as a recipe's default `shard_size`
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class OriginalCheckpointError(SourceError):
    """The folder is not a checkpoint written by the original MixtureKit's `build_moe` (release 1.1.1 layout)."""


@dataclass
class Conversion:
    """What `convert_original` wrote, and what a user must know about it: `notes`, one sentence each; `same_logits`
    is False where the original's forward computes something else from these weights (a note says what and why)."""

    path: Path
    method: str
    notes: list[str] = field(default_factory=list)
    same_logits: bool = True


# -- their config ---------------------------------------------------------------------------------------------------

def read_original_config(folder: Path) -> dict:
    """Their config.json, after checking it is the original's 1.1.1 layout; a clear error otherwise."""
    if not folder.is_dir():
        raise OriginalCheckpointError(f"'{folder}' is not a folder: give the folder the original MixtureKit's "
                                      "`build_moe` (or `mixturekit build` / `mixturekit train`) wrote")
    path = folder / "config.json"
    if not path.is_file():
        raise OriginalCheckpointError(f"'{folder}' has no config.json: it is not a checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise OriginalCheckpointError(f"'{path}' is not valid JSON: {error}") from None
    if config.get("model_type") == MixtureKitConfig.model_type:
        raise OriginalCheckpointError(
            f"'{folder}' is already a moekit checkpoint (model_type {MixtureKitConfig.model_type}): nothing to "
            "convert; load it with `import moekit` and AutoModelForCausalLM")
    model_class = str((config.get("auto_map") or {}).get("AutoModelForCausalLM", ""))
    if config.get("moe_method") not in METHODS or not model_class.endswith(".MixtureKitForCausalLM"):
        found = (f"model_type {config.get('model_type')!r}, moe_method {config.get('moe_method')!r}"
                 if config.get("model_type") else "no model_type")
        raise OriginalCheckpointError(
            f"'{folder}' is not a checkpoint written by the original MixtureKit ({found}): its `build_moe` writes "
            f"moe_method (one of {', '.join(METHODS)}) and an auto_map to modeling_<model_type>.MixtureKitForCausalLM")
    if not config.get("base_model_class"):
        raise OriginalCheckpointError(
            f"'{folder}' was written by a release of the original MixtureKit older than 1.1.1 (its config has no "
            f"base_model_class): bring it to the current layout with that project first, `from {OTHER_IMPORT_NAME} "
            "import upgrade_checkpoint; upgrade_checkpoint(PATH, 'LlamaForCausalLM')` (its experts' causal-LM class), "
            "then convert it")
    if (folder / "adapter_config.json").is_file() and not weight_files(folder):
        raise OriginalCheckpointError(
            f"'{folder}' holds a LoRA adapter (the original's `train` with use_lora saves only that): merge it into "
            "the model first (peft's merge_and_unload, then save_pretrained), then convert the merged folder")
    return config


def base_text_config(config: dict) -> transformers.PretrainedConfig:
    """The base model's config: their flat config without the fields the original adds."""
    name = config["base_model_class"]
    model_class = getattr(transformers, name, None)
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise UnsupportedArchitectureError(
            f"base_model_class '{name}' is not a transformers model class in transformers {transformers.__version__}: "
            "the checkpoint's experts must be a family this transformers builds")
    legacy = set(config.get("mixturekit_legacy_rope") or {})  # transformers 4 copies of rope_parameters
    fields = {k: v for k, v in config.items() if k not in ORIGINAL_FIELDS and k not in legacy}
    fields["architectures"] = [name]
    return config_class(**fields)


def _names(config: dict) -> list[str]:
    """Their expert names (a Hub id where none was given), as names our modules and recipes take."""
    names = []
    for position, name in enumerate(config.get("expert_names") or []):
        name = _NAME.sub("_", str(name)).strip("_-") or f"expert_{position}"
        names.append(name if name not in names else f"{name}_{position}")
    if len(names) != config.get("num_experts"):
        raise OriginalCheckpointError(f"its config lists {len(names)} expert_names for num_experts "
                                      f"{config.get('num_experts')}: the config.json was edited or is damaged")
    return names


# -- where our tensors come from ------------------------------------------------------------------------------------


def _routed_sources(plan: SourcePlan, model: torch.nn.Module, num_experts: int) -> None:
    from ..runtime.routed.moe_block import SparseMoeBlock
    from ..runtime.routed.routed_linear import RoutedLinear

    for path, module in model.routed_modules():
        if isinstance(module, SparseMoeBlock):  # theirs: a whole FFN copy per expert, `experts.I.<dense names>`
            plan.router(f"{path}.gate.weight", f"{path}.gate.weight")
            for ours, source in module.source_map.items():
                plan.stacked(f"{path}.{ours}", [f"{path}.experts.{i}.{name}" for i in range(num_experts)
                                                for name in source.names], source.transpose)
        elif isinstance(module, RoutedLinear):  # theirs: a copy of the Linear per expert, `experts.expert_I.*`
            plan.router(f"{path}.router.weight", f"{path}.gate.weight")
            for ours, source in module.source_map.items():
                plan.stacked(f"{path}.{ours}", [f"{path}.experts.expert_{i}.{name}" for i in range(num_experts)
                                                for name in source.names], source.transpose)


# -- conversion -----------------------------------------------------------------------------------------------------

def _routed_layers(reader: CheckpointReader, layers_prefix: str) -> tuple[list[str], list[int]]:
    """btx: the routed projections (paths inside a block) and the blocks routed, from their tensor names."""
    pattern = re.compile(rf"^{re.escape(layers_prefix)}\.(\d+)\.(.+)\.experts\.expert_0\.weight$")
    found = [match.groups() for match in map(pattern.match, reader.names()) if match]
    paths = sorted({path for _, path in found})
    blocks = sorted({int(block) for block, _ in found})
    if not paths:
        raise CheckpointError("this btx checkpoint holds no routed projection (no '*.experts.expert_0.weight')")
    per_block = {b: {p for block, p in found if int(block) == b} for b in blocks}
    if any(paths_here != set(paths) for paths_here in per_block.values()):
        raise UnsupportedArchitectureError(f"its blocks route different projections ({per_block}): moekit routes the "
                                           "same projections in every routed block")
    return paths, blocks


def convert_original(source: str | Path, output: str | Path, overwrite: bool = False,
                     progress: bool = True) -> Conversion:
    """Convert the original MixtureKit's checkpoint folder `source` into a moekit checkpoint at `output`."""
    from ..runtime.base_model.architecture import decoder_layers
    from ..runtime.assembly.checkpoint_check import saved_tensor_shapes
    from ..runtime.assembly.modeling import MixtureKitForCausalLM

    folder = Path(source).expanduser()
    original = read_original_config(folder)
    target = Path(output).expanduser().absolute()
    check_output_folder(target, overwrite)
    files = weight_files(folder)
    if not files:
        raise OriginalCheckpointError(f"'{folder}' holds no safetensors weights (model.safetensors or an index)")
    reader = CheckpointReader(files)
    method, names = original["moe_method"], _names(original)
    text_config = base_text_config(original)
    dtypes = [reader.info(n).dtype for n in reader.names() if reader.info(n).dtype.is_floating_point]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    notes: list[str] = []
    same_logits = True

    with torch.device("meta"):
        dense = transformers.AutoModelForCausalLM.from_config(text_config)
    layers_prefix = decoder_layers(dense, text_config)[0]
    num_blocks = len(decoder_layers(dense, text_config)[1])
    fields = dict(text_config=text_config, method=method, num_experts_per_tok=original.get("num_experts_per_tok", 2),
                  alpha=float(original.get("alpha", 0.0)), stitch_dropout=0.0)
    if method == "bts":
        points = original_stitch_points(original, num_blocks)
        directions = original_stitch_directions(points, num_blocks)
        config = MixtureKitConfig(**{**fields, "num_experts_per_tok": len(names) - 1}, expert_names=names[1:],
                                  expert_configs=[text_config] * (len(names) - 1), stitch_layers_index=points,
                                  stitch_directions=directions)
    elif method == "btx":
        router_layers, blocks = _routed_layers(reader, layers_prefix)
        config = MixtureKitConfig(**fields, expert_names=names, router_layers=router_layers, router_layers_index=blocks)
        unreachable = [entry for entry in original.get("router_layers") or [] if entry not in router_layers]
        if unreachable:
            same_logits = False
            notes.append(
                f"its router_layers {unreachable} are not paths inside a block ({', '.join(router_layers)} are): the "
                "original's build stores them routed, but its modeling file looks each up as an attribute path of "
                "the decoder block, finds nothing, routes nothing, and loads the dense projections as missing "
                "weights, drawn at random at every load. Its logits are not a function of this checkpoint; the "
                "converted model routes these projections as the build stored them")
    else:
        config = MixtureKitConfig(**fields, expert_names=names, router_layers_index=list(range(num_blocks)))
    config.architectures = ["MixtureKitForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype

    with torch.device("meta"):
        model = MixtureKitForCausalLM(config)
    expected = saved_tensor_shapes(model)
    plan = SourcePlan(reader, expected, dtype)
    # its build stores tied copies (an LM head tied to the embeddings) as tensors of their own; ours ties them on load
    plan.used.update(name for name in getattr(model, "all_tied_weights_keys", None) or {} if plan.has(name))
    if method == "bts":
        stitch_notes, differs = stitch_sources(plan, config.stitch_layers_index, config.stitch_directions,
                                                len(names) - 1, text_config.hidden_size)
        notes += stitch_notes
        stream_sources(plan, names[1:], getattr(dense, "base_model_prefix", "model"))
        same_logits = same_logits and not differs
        notes.append(
            f"the original's bts model hands its expert layers the KV cache under the name `past_key_values`; from "
            f"transformers 5.24 the decoder passes it as `cache`, so there its expert layers write into the hub's "
            f"cache and attend over the hub's keys and values too, whenever a cache is on (a forward's default, and "
            f"every generation; installed here: transformers {transformers.__version__}). The converted model equals "
            "the original's with use_cache=False, where each expert stream attends over its own tokens, as in the paper")
    else:
        _routed_sources(plan, model, len(names))
    for name in expected:  # the rest keeps its name: attention, norms, embeddings, the hub
        if name not in plan.outputs:
            if not plan.has(name):
                raise CheckpointError(f"the original checkpoint lacks '{name}', which its base model "
                                      f"{original['base_model_class']} needs: it is incomplete")
            plan.copy(name, name)
    plan.check()
    if plan.new_routers:
        same_logits = False
        notes.append(
            f"its {len(plan.new_routers)} routers are not in the checkpoint (a fresh build: the original draws them at "
            "random at every load, so no two loads of it route alike); written with moekit's initial routers "
            f"(seeded normal, std {ROUTER_INIT_STD}): train them (`moekit train`) before relying on the routing")

    slots = [TensorSlot(name, plan.outputs[name].dtype, plan.outputs[name].shape) for name in expected]
    with staged_output(target, "converted checkpoint", sum(slot.nbytes for slot in slots)) as staging:
        write_sharded(staging, slots, lambda slot: plan.outputs[slot.name].parts(), SHARD_BYTES, progress,
                      desc="converting")
        config.save_pretrained(staging)  # with auto_map, also the loader files it names
        copy_tokenizer_files(folder, staging)
        for name in ("mixturekit_config.json",):  # their build's own config, kept for the record
            if (folder / name).is_file():
                (staging / f"original_{name}").write_bytes((folder / name).read_bytes())
        _write_recipe(staging, original, names, config)
        _write_card(staging, folder, original, config, notes)
    return Conversion(path=target, method=method, notes=notes, same_logits=same_logits)


def _write_recipe(folder: Path, original: dict, names: list[str], config: MixtureKitConfig) -> None:
    """The recipe of the same composition (sources, method, routing), which `benchmark` and `push` read: composing
    it again gives moekit's initial routers and stitches, not the trained ones converted here."""
    from ..recipe import load_recipe

    sources = original.get("expert_model_ids") or []
    data: dict = {"method": config.method, "alpha": config.alpha,
                  "experts": [{"name": name, "source": str(source)} for name, source in zip(names, sources)]}
    if config.method == "bts":
        data.update(hub=names[0], stitch_layers_index=list(config.stitch_layers_index))
    else:
        data["num_experts_per_tok"] = config.num_experts_per_tok
    if config.method == "btx":
        data.update(router_layers=list(config.router_layers), router_layers_index=list(config.router_layers_index))
    if len(data["experts"]) != len(names):
        return  # no sources recorded: no recipe rather than a wrong one
    (folder / "mixturekit_recipe.yaml").write_text(load_recipe(data).to_yaml(), encoding="utf-8")


def _write_card(folder: Path, source: Path, original: dict, config: MixtureKitConfig, notes: list[str]) -> None:
    from ..distribution import VERSION

    rows = "\n".join(f"| {name} | `{model_id}` |" for name, model_id in
                     zip(original.get("expert_names") or [], original.get("expert_model_ids") or []))
    roles = ("the first is the hub, the others frozen expert streams" if config.method == "bts"
             else f"top-{config.num_experts_per_tok} routing")
    findings = "\n".join(f"- {note}." for note in notes) or (
        "- Same function as the original's model on these weights (same logits in float32).")
    text = card_front_matter(["moekit", "mixture-of-experts", config.method]) + f"""
# Converted to MixtureKit {VERSION} from the original MixtureKit

A `{config.method}` model built by the original MixtureKit (the registry's `{OTHER_DISTRIBUTION}`, model_type
`{original.get('model_type')}`, base class `{original.get('base_model_class')}`), converted by
`moekit convert-original` with its routers and stitches as they were: {roles}. It loads without
`trust_remote_code`:

```python
# install MixtureKit: {install_instruction()}
import moekit  # registers the architecture with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{folder.name}")
```

## What to know

{findings}

## Experts

| name | source |
| --- | --- |
{rows}

`mixturekit_recipe.yaml` names the same sources and routing; composing it again gives moekit's initial routers and
stitches, not the ones converted here. `original_mixturekit_config.json` is the original build's own config.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")
