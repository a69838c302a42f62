"""Writing a checkpoint folder so that it appears whole or not at all: check the output, stage beside it, write
size-bounded safetensors shards one tensor at a time, swap into place. Compose and export both write this way."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import OutputError
from .resolve import TOKENIZER_FILES
from .safetensors_io import ShardWriter, TensorSlot

STAGING_PREFIX = ".moekit-partial-"


def assign_shards(tensors: list, shard_bytes: int) -> list[list]:
    """Greedy, in order: a new shard starts when the next tensor would push the current one past `shard_bytes`."""
    shards: list[list] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def check_output_folder(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless `overwrite`), is a file, or lies under a file or a read-only folder.
    Nothing is created here: missing parents are made only once the plan has been checked."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a folder; remove it or choose another output folder")
    if output.exists() and not overwrite:
        raise OutputError(f"output '{output}' already exists; choose another folder or pass overwrite=True (--overwrite)")
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create '{output}': '{ancestor}' is a file, not a folder; choose another output folder")
    if not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write into '{ancestor}': permission denied; choose a writable output folder")


def new_staging_folder(output: Path) -> Path:
    """A fresh hidden folder beside `output` (its parents made now), named with our PID so that a later run can
    tell an abandoned one (its process gone) from one in use, and remove it."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder '{output.parent}': {error}; choose another output folder") from None
    _remove_abandoned_staging(output)
    staging = output.parent / f"{STAGING_PREFIX}{output.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


@contextmanager
def staged_output(output: Path, what: str, nbytes: int) -> Iterator[Path]:
    """A fresh staging folder for `output`, swapped into place when the block ends and removed if it raises, so the
    output appears whole or not at all. A failed write (a full disk...) is an OutputError that names `what` was being
    written and about how much space (`nbytes`) it needs."""
    staging = new_staging_folder(output)
    try:
        yield staging
        swap_into_place(staging, output)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(
            f"writing the {what} '{output}' failed: {error}; nothing was written: free some space (it needs about "
            f"{nbytes / 1e9:.2f} GB) or choose another output folder"
        ) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """The tokenizer files and the generation config of the checkpoint folder `source`, those it has, into `folder`:
    a checkpoint written from others' tensors generates and tokenizes as its source does."""
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


# What `ProcessorMixin.save_pretrained` writes beside the tokenizer's files: the image (and video) processor's
# settings and the processor's own (its class, image token counts, chat template).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


def copy_processor_files(source: Path, folder: Path) -> None:
    """The processor files of the checkpoint folder `source`, those it has, into `folder`: a composition of image-text
    models is loaded with `AutoProcessor` as its source is."""
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _remove_abandoned_staging(output: Path) -> None:
    """Staging folders of composes that were killed (their process is gone) are removed before a new one starts."""
    for leftover in output.parent.glob(f"{STAGING_PREFIX}{output.name}-*"):
        pid = leftover.name.removeprefix(f"{STAGING_PREFIX}{output.name}-").split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass

def write_sharded(
    folder: Path, slots: list[TensorSlot], parts_of: Callable[[TensorSlot], Iterable[torch.Tensor]],
    shard_bytes: int, progress: bool = False, desc: str = "writing",
) -> None:
    """Write tensors (given by `slots`, produced part by part by `parts_of`) as size-bounded safetensors shards in
    `folder`, with an index when there is more than one; one tensor in memory at a time."""
    shards = assign_shards(slots, shard_bytes)
    count = len(shards)
    names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    total_bytes = sum(slot.nbytes for slot in slots)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for filename, shard in zip(names, shards):
            writer = ShardWriter(folder / filename, shard, metadata={"format": "pt"})
            for slot in shard:
                writer.write_parts(slot.name, parts_of(slot))
                bar.update(slot.nbytes)
            writer.close()
    if count > 1:
        weight_map = {slot.name: filename for filename, shard in zip(names, shards) for slot in shard}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def swap_into_place(staging: Path, output: Path) -> None:
    """Put the finished `staging` folder at `output`; an existing output is retired first and restored if the
    rename fails, so a reader sees the old folder or the new one, never a mix."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.parent / f"{STAGING_PREFIX}old-{uuid.uuid4().hex[:8]}"
    output.rename(retired)
    try:
        staging.rename(output)
    except OSError:
        retired.rename(output)
        raise
    shutil.rmtree(retired, ignore_errors=True)
