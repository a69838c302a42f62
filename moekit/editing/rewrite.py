"""Write an edited copy of a composed checkpoint: some experts kept (in a new order), optionally one appended, every
other tensor copied as it is; streamed like compose (byte ranges of the source files, one tensor at a time, through
the same shard writer), appearing atomically at the output.

An expert's chunk of a stacked tensor is a contiguous byte range of its file, so keeping experts copies bytes and
never loads a tensor; only an appended expert's chunks are computed (`NewExpert`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import CheckpointError, OutputError
from ..recipe import parse_size
from ..runtime.assembly.config import MixtureKitConfig
from ..sources.checkpoint_folder import check_output_folder, staged_output, write_sharded
from ..sources.resolve import weight_files
from ..sources.safetensors_io import CheckpointReader, FileSlice, TensorInfo, TensorSlot
from .expert_tensors import ExpertOwned, ExpertRows, expert_tensors, meta_model

# Files of a checkpoint folder an edit writes anew; every other file (tokenizer, processor, generation config, the
# recipe it was composed from, loader files) is copied as it is.
REWRITTEN = ("config.json", "README.md", "model.safetensors.index.json")


@dataclass
class NewExpert:
    """An expert appended after the kept ones: its name, its chunk of each per-expert rows tensor
    (`rows(name, kind, chunk_shape, dtype)`), and its bts stream config (None for routed methods)."""

    name: str
    rows: Callable[[str, ExpertRows, tuple[int, ...], torch.dtype], torch.Tensor]
    stream_config: dict | None = None


def _chunks(info: TensorInfo, kind: ExpertRows, num_experts: int) -> tuple[int, int]:
    """(rows per chunk, bytes per chunk) of a per-expert rows tensor, checked against its shape."""
    total = info.shape[0] if info.shape else 0
    count = kind.leading + num_experts
    if total % count:
        raise CheckpointError(f"tensor '{info.name}' has {total} rows, not a multiple of the {count} chunks "
                              f"({num_experts} experts) its config implies; the checkpoint does not match its config")
    rows = total // count
    return rows, info.nbytes // count


def edited_checkpoint(
    checkpoint: str | Path, output: str | Path, keep: list[int], edit: dict | None, added: NewExpert | None = None,
    overwrite: bool = False, shard_size: int | str = "2GB", progress: bool = False,
    replaced: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoint` with only the experts at indices `keep` (in that order), then `added`, to `output`;
    `edit` is appended to the config's `edits` (None: nothing is recorded). `replaced`: whole tensors (router weights) written instead of the
    stored ones, by name. Nothing is written when anything is refused."""
    checkpoint = Path(checkpoint)
    output = Path(output).expanduser().absolute()
    if output == checkpoint.expanduser().absolute():
        raise OutputError(f"the output '{output}' is the checkpoint being edited; write the edit to another folder")
    check_output_folder(output, overwrite)
    config = MixtureKitConfig.from_pretrained(checkpoint)
    owners = expert_tensors(meta_model(config))
    reader = CheckpointReader(weight_files(checkpoint))
    num_experts, names = config.num_experts, list(config.expert_names)
    new_names = [names[i] for i in keep] + ([added.name] if added else [])
    slots, parts = [], {}
    for name, info in reader.tensors.items():
        if not isinstance(info, TensorInfo):
            raise CheckpointError(f"tensor '{name}' is converted on load, which editing cannot stream; recompose "
                                  "without the removed expert instead")
        kind = owners.get(name)
        if replaced and name in replaced:
            tensor = replaced[name].to(info.dtype).contiguous()
            slots.append(TensorSlot(name, info.dtype, tuple(tensor.shape)))
            parts[name] = (lambda t=tensor: iter([t]))
        elif isinstance(kind, ExpertRows):
            rows, nbytes = _chunks(info, kind, num_experts)
            chosen = list(range(kind.leading)) + [kind.leading + i for i in keep]
            count = len(chosen) + (1 if added else 0)
            slots.append(TensorSlot(name, info.dtype, (rows * count, *info.shape[1:])))
            parts[name] = (lambda info=info, chosen=chosen, nbytes=nbytes, kind=kind, rows=rows, name=name:
                           _row_parts(info, chosen, nbytes, added, name, kind, (rows, *info.shape[1:])))
        elif isinstance(kind, ExpertOwned):
            if kind.expert not in keep:
                continue
            new_index = keep.index(kind.expert)
            renamed = kind.renamed(new_index, names[kind.expert])
            slots.append(TensorSlot(renamed, info.dtype, info.shape))
            parts[renamed] = (lambda info=info: iter([FileSlice(info.file, info.start, info.nbytes, info.dtype)]))
        else:
            slots.append(TensorSlot(name, info.dtype, info.shape))
            parts[name] = (lambda info=info: iter([FileSlice(info.file, info.start, info.nbytes, info.dtype)]))
    unmatched = sorted(set(replaced or {}) - set(reader.tensors))
    if unmatched:
        raise CheckpointError(f"the checkpoint has no tensor {unmatched[0]!r} to replace; it does not match its config")
    if added is not None and added.stream_config is not None:
        raise CheckpointError("adding a bts expert stream is not supported; recompose with the new expert")
    edited = _edited_config(config, keep, new_names, added, edit)
    with staged_output(output, "edited checkpoint", sum(slot.nbytes for slot in slots)) as staging:
        write_sharded(staging, slots, lambda slot: parts[slot.name](), parse_size(shard_size), progress,
                      desc="editing")
        for path in checkpoint.iterdir():
            if path.is_file() and not path.name.endswith(".safetensors") and path.name not in REWRITTEN:
                shutil.copyfile(path, staging / path.name)
        edited.save_pretrained(staging)
        _write_card(checkpoint / "README.md", staging / "README.md", edited)
    return output


def _row_parts(info: TensorInfo, chosen: list[int], nbytes: int, added: NewExpert | None, name: str,
               kind: ExpertRows, chunk_shape: tuple[int, ...]) -> Iterator[FileSlice | torch.Tensor]:
    for chunk in chosen:
        yield FileSlice(info.file, info.start + chunk * nbytes, nbytes, info.dtype)
    if added is not None:
        tensor = added.rows(name, kind, chunk_shape, info.dtype)
        if tuple(tensor.shape) != tuple(chunk_shape):
            raise CheckpointError(f"the new expert '{added.name}' gives tensor '{name}' a chunk of shape "
                                  f"{list(tensor.shape)}, the checkpoint's experts have {list(chunk_shape)}")
        yield tensor.to(info.dtype).contiguous()


def _edited_config(config: MixtureKitConfig, keep: list[int], new_names: list[str], added: NewExpert | None,
                   edit: dict) -> MixtureKitConfig:
    edited = MixtureKitConfig.from_dict(config.to_dict())
    edited.expert_names = new_names
    if config.method == "bts":
        edited.expert_configs = [config.expert_configs[i] for i in keep] + (
            [added.stream_config] if added and added.stream_config else [])
    edited.disabled_experts = [n for n in config.disabled_experts if n in new_names]
    edited.edits = [*config.edits, edit] if edit is not None else list(config.edits)
    return edited


def _write_card(source: Path, target: Path, config: MixtureKitConfig) -> None:
    """The source's model card with an `## Edits` section listing every edit (replaced if it had one)."""
    text = source.read_text(encoding="utf-8") if source.is_file() else "# Composed with MixtureKit\n"
    text = text.split("\n## Edits\n")[0].rstrip() + "\n"
    if not config.edits:
        target.write_text(text, encoding="utf-8")
        return
    lines = [f"- {_describe(edit)}" for edit in config.edits]
    text += ("\n## Edits\n\nApplied by `moekit edit` after composing, oldest first (also in config.json, `edits`). "
             f"The experts now are: {', '.join(f'`{n}`' for n in config.expert_names)}.\n\n" + "\n".join(lines) + "\n")
    target.write_text(text, encoding="utf-8")


def _describe(edit: dict) -> str:
    def shown(value) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)

    details = "; ".join(f"{key.replace('_', ' ')}: {shown(value)}" for key, value in edit.items()
                        if key != "operation")
    return f"{edit.get('operation', 'edit')}: {details}"
