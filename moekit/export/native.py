"""Export a composed model to a native MoE architecture that serving engines run (no custom code needed).

`traditional` over Llama/Mistral is Mixtral; over Qwen3 it is Qwen3-MoE; over Qwen2 it is Qwen2-MoE, and over
Qwen3.5's text model (Gated DeltaNet beside attention) Qwen3.5-MoE's, whose shared expert is, in both, the
composition's (`shared_expert: base`: ``½ · routed + s · shared`` is Qwen2-MoE's ``routed + sigmoid(gate · x) ·
shared`` with the routed `down_proj` halved, and an ungated one gets a zero gate, sigmoid(0) = ½ exactly) or
else switched off (zero weights, so it adds exactly zero). The composition's stacked experts are already the
transformers 5 layout of those models, so the export streams tensors across, split per expert for the Hub layout
that engines read unless `layout="packed"` (`expert_layout`), and writes the target's config. Routing matches too:
softmax, top-k, renormalised (Mixtral always renormalises; the Qwen MoE configs get `norm_topk_prob: true`).

The image-text wrappers export whole: `traditional` over Qwen3-VL is Qwen3-VL-MoE (its router always renormalises the
top-k; dense blocks through `mlp_only_layers`; no shared expert), over Qwen3.5 it is Qwen3.5-MoE (the text model's
mapping above); the vision tower, projector and processor go across as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from ..recipe import parse_size
from ..errors import MixtureKitError
from ..runtime.base_model.architecture import num_layers
from ..runtime.assembly.config import MixtureKitConfig, require_composed, stored_model_type
from ..sources.checkpoint_folder import (
    check_output_folder, copy_processor_files, copy_tokenizer_files, new_staging_folder, swap_into_place,
    write_sharded,
)
from ..sources.resolve import weight_files
from ..sources.safetensors_io import CheckpointReader, TensorSlot
from ..runtime.routed.shared_expert import ROUTED_SCALE, SHARED_EXPERT
from .expert_layout import LAYOUTS, Piece, is_routed_down_proj, per_expert_pieces, piece_reader
from .targets import EXPORT_TARGETS, MAPPING_TABLE, ExportTarget, target_for_family

# Families whose own MoE sibling does not compute what a composition of them computes, and why.
NO_EXACT_MAPPING = {
    "gemma4_text": "Gemma 4's MoE layer (enable_moe_block) normalises its dense MLP's output and its experts' output "
                   "each with an RMSNorm of its own (post_feedforward_layernorm_1 and _2) before adding them, where a "
                   "composition (with or without a shared expert) adds the experts' outputs and normalises the sum: "
                   "no choice of weights makes the two equal",
}
NO_EXACT_MAPPING["gemma4"] = NO_EXACT_MAPPING["gemma4_text"]  # the image-text wrapper around that text model


class ExportError(MixtureKitError, ValueError):
    """The composed model has no native equivalent in the requested architecture."""


def _refuse_unmappable(config: MixtureKitConfig, target: ExportTarget | None) -> list[int]:
    """Raise with the reason when the composition cannot map; return the routed blocks."""
    text = config.language_config
    disabled = list(getattr(config, "disabled_experts", None) or [])
    if disabled:
        raise ExportError(
            f"experts {disabled} are opted out (config disabled_experts), which no native MoE config can hold: "
            f"write a checkpoint without them first (moekit edit CHECKPOINT --remove {disabled[0]} -o OUT, the same "
            "function), then export that; or enable them again (model.enable_experts())")
    if config.method == "btx":
        raise ExportError(
            "a btx model has one router per projection; native MoE architectures route the whole FFN with one "
            "router per block, so the same model cannot be written (sharing one router's decisions across gate/up/"
            f"down would be a different model). Compose with method: traditional to export. ({MAPPING_TABLE})"
        )
    if config.method == "bts":
        raise ExportError(f"a bts model (hub + expert streams + stitches) has no native MoE equivalent ({MAPPING_TABLE})")
    family = config.text_config.model_type  # an image-text composition: the wrapper's (qwen3_vl, qwen3_5)
    expected = target_for_family(family)
    if family in NO_EXACT_MAPPING:
        raise ExportError(f"traditional over '{family}' has no exact native MoE: "
                          f"{NO_EXACT_MAPPING[family]} ({MAPPING_TABLE})")
    if expected is None:
        raise ExportError(f"no native MoE architecture for traditional over '{family}' ({MAPPING_TABLE})")
    if target is not expected:
        raise ExportError(f"traditional over '{family}' exports to {expected.name}, not {target.name} ({MAPPING_TABLE})")
    if getattr(config, "shared_expert", None) is not None and not target.shared_expert:
        raise ExportError(
            f"this composition has a shared expert, which {target.name} does not have (of the native targets only "
            "Qwen2-MoE and Qwen3.5-MoE have one): compose over Qwen2 or Qwen3.5 to export it, or compose without "
            "shared_expert")
    blocks = num_layers(text)
    routed = sorted(config.router_layers_index) if config.router_layers_index else list(range(blocks))
    if target.every_block and len(routed) != blocks:
        raise ExportError(
            f"{target.every_block} routes every block, but this model routes only blocks {routed} of {blocks}; compose with "
            "router_layers_index covering every block (Qwen2/Qwen3 MoE targets can keep dense blocks via "
            "mlp_only_layers)"
        )
    for flag in ("mlp_bias", "attention_bias"):
        if getattr(text, flag, False) and not target.biases:
            raise ExportError(f"the base model has {flag}: true, which {target.every_block or target.name} does not "
                              "support")
    return routed


def export_target(config: MixtureKitConfig) -> tuple[str | None, str]:
    """The native architecture a composition exports to, or None and the reason it cannot (for `inspect`)."""
    target = target_for_family(config.text_config.model_type)
    try:
        _refuse_unmappable(config, target)
    except ExportError as error:
        return None, str(error).split(" (traditional over")[0]
    return target.name, f"moekit export CHECKPOINT --to {target.name} -o OUT"


_NOT_CARRIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


def _without(fields: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in fields.items() if k not in keys}


def _target_config(config: MixtureKitConfig, target: ExportTarget, routed: list[int]):
    text = _without(config.language_config.to_dict(), _NOT_CARRIED)
    blocks = num_layers(config.language_config)
    fields = dict(text, num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.alpha,
                  output_router_logits=False)
    fields.update(target.moe_fields(config, text, routed, blocks))
    if target.image_text:  # the wrapper's own fields (image tokens, vision tower) around the MoE text model's
        wrapper = _without(config.text_config.to_dict(), (*_NOT_CARRIED, "text_config", "vision_config"))
        vision = _without(config.text_config.vision_config.to_dict(), _NOT_CARRIED)
        exported = AutoConfig.for_model(target.name, **wrapper, text_config=fields, vision_config=vision)
    else:
        exported = AutoConfig.for_model(target.name, **fields)
    exported.architectures = [target.class_name]
    return exported


def _zero_shared_experts(routed: list[int], hidden: int, dtype: torch.dtype, gate_only: bool = False,
                         layers: str = "model.layers") -> list[tuple[TensorSlot, torch.Tensor]]:
    """Qwen2-MoE's (and Qwen3.5-MoE's) shared expert, switched off: a width-1 FFN with zero weights adds exactly zero. `gate_only`: just
    the zero gate, for a composition's ungated shared expert (weight sigmoid(0) = ½, as it has)."""
    out = []
    for block in routed:
        prefix = f"{layers}.{block}.mlp.{SHARED_EXPERT}"
        expert = () if gate_only else (
            (f"{prefix}.gate_proj.weight", (1, hidden)), (f"{prefix}.up_proj.weight", (1, hidden)),
            (f"{prefix}.down_proj.weight", (hidden, 1)))
        for name, shape in (*expert, (f"{prefix}_gate.weight", (1, hidden))):
            out.append((TensorSlot(name, dtype, shape), torch.zeros(shape, dtype=dtype)))
    return out


def _selection_bias(name: str, reader: CheckpointReader, target: ExportTarget) -> bool:
    """Whether `name` is a router's selection bias (loss-free balancing), which the native checkpoint leaves out; a
    bias that is not zero changes the routing, and no native target has a place for it, so it is refused."""
    if not name.endswith(".expert_bias"):
        return False
    if reader.get(name).any():
        raise ExportError(
            f"router bias '{name}' is not zero: this model was trained with balance: bias (loss-free balancing), whose "
            f"selection bias changes which experts run, and {target.name} has no such bias, so the export would route "
            "differently; serve the composed checkpoint itself (it loads with transformers after `import moekit`)"
        )
    return True


def _refuse_ambiguous_transpose(config: MixtureKitConfig, target: ExportTarget) -> None:
    """transformers tells Qwen3-VL-MoE's transposed Hub layout from its own by shape alone; a square one would be
    read untransposed, so it is refused (the packed layout loads whatever the sizes)."""
    hidden, width = config.language_config.hidden_size, config.language_config.intermediate_size
    if hidden in (width, 2 * width):
        raise ExportError(
            f"{target.name}'s Hub layout stores experts transposed and transformers recognises it only by a shape that "
            f"differs from its own, which a hidden size of {hidden} beside an FFN width of {width} does not give; "
            "export with layout packed (--layout packed), which transformers loads as is")


def export(
    checkpoint: str | Path, to: str = "auto", output: str | Path | None = None, overwrite: bool = False,
    shard_size: int | str = "2GB", progress: bool = False, layout: str = "per-expert",
) -> Path:
    """Write the composed checkpoint as a native MoE checkpoint (`to`: auto or a name of `EXPORT_TARGETS`),
    streamed one tensor at a time into size-bounded shards, appearing atomically. `layout`: `per-expert` (the Hub
    checkpoints' layout, which llama.cpp's converter and the serving engines read) or `packed` (transformers 5's own;
    see `expert_layout`)."""
    checkpoint = Path(checkpoint)
    if stored_model_type(checkpoint) is None:
        raise ExportError(f"'{checkpoint}' has no config.json: give a folder written by moekit compose")
    require_composed(checkpoint, "only a composition has routers to export", ExportError)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    if to != "auto" and to not in EXPORT_TARGETS:
        raise ExportError(f"unknown target '{to}'; valid: auto, {', '.join(sorted(EXPORT_TARGETS))} "
                          f"({MAPPING_TABLE})")
    if layout not in LAYOUTS:
        raise ExportError(f"unknown layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    target = target_for_family(config.text_config.model_type) if to == "auto" else EXPORT_TARGETS[to]
    routed = _refuse_unmappable(config, target)
    if output is None:
        raise ExportError("no output folder given (-o/--output)")
    output = Path(output).expanduser().absolute()
    check_output_folder(output, overwrite)
    reader = CheckpointReader(weight_files(checkpoint))
    exported_config = _target_config(config, target, routed)
    dtype = next(info.dtype for info in reader.tensors.values() if info.dtype.is_floating_point)
    staging = new_staging_folder(output)
    try:
        stored = [TensorSlot(name, info.dtype, info.shape) for name, info in reader.tensors.items()
                  if not _selection_bias(name, reader, target)]
        if layout == "per-expert" and target.transposed_hub_layout:
            _refuse_ambiguous_transpose(config, target)
        pieces = dict(per_expert_pieces(stored, target) if layout == "per-expert" else
                      [(slot, Piece(slot.name)) for slot in stored])
        shared = getattr(config, "shared_expert", None) is not None
        if shared:  # ½ · routed: the routed experts' down_proj halved (exact), see the module docstring
            pieces = {slot: piece._replace(scale=ROUTED_SCALE) if is_routed_down_proj(piece.source) else piece
                      for slot, piece in pieces.items()}
        extra = {}
        if target.shared_expert and not (shared and config.shared_expert_gate):
            extra = dict(_zero_shared_experts(routed, config.language_config.hidden_size, dtype, gate_only=shared,
                                              layers=target.layers))
        read = piece_reader(reader.get)
        write_sharded(staging, list(pieces) + list(extra),
                      lambda slot: [extra[slot]] if slot in extra else [read(pieces[slot])],
                      parse_size(shard_size), progress, desc="exporting")
        exported_config.save_pretrained(staging)
        copy_tokenizer_files(checkpoint, staging)
        if target.image_text:  # the processor composed beside the checkpoint (image processor, image tokens)
            copy_processor_files(checkpoint, staging)
        (staging / "README.md").write_text(
            f"---\nlibrary_name: transformers\ntags:\n- moekit\n- {target.name}\n---\n\n# {target.name} export\n\n"
            f"Exported by MixtureKit from `{checkpoint.name}`, a `traditional` composition of "
            f"{config.num_experts} `{config.text_config.model_type}` experts ({', '.join(config.expert_names)}), "
            f"top-{config.num_experts_per_tok}{', with the base as shared expert' if shared else ''}. Loads with plain `transformers` (`{exported_config.architectures[0]}`)"
            " and serving engines that run it; no custom code.\n", encoding="utf-8")
        swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
