"""Writing a checkpoint folder so that it appears whole or not at all: check the output, stage beside it, write
size-bounded safetensors shards one tensor at a time, swap into place. Compose, export, merge and training's run
folder all write this way.

`overwrite` replaces only what this project wrote (`describe_own_output`), and the swap is journaled: a kill at any
step leaves the old or the new folder at the output path, or a journal from which the next write to that path
finishes the swap and says so (`recover_interrupted_swap`).
"""

from __future__ import annotations

import json
import logging
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
RETIRED_PREFIX = ".moekit-retired-"  # the old folder, between the two renames of an overwrite and its removal
JOURNAL_PREFIX = ".moekit-swap-"  # `<prefix><output name>.json`: the overwrite of that output in progress
# The name moekit 0.1's overwrite gave the old folder: a kill between its two renames left it behind, unrecorded.
LEGACY_RETIRED_PREFIX = ".moekit-partial-old-"
# What a training run records in its output folder (`training.output_guard`).
TRAINING_RECORD = "mixturekit_train.yaml"

logger = logging.getLogger(__name__)


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
    """Refuse an output that exists (unless `overwrite` and it is what this project wrote, see `describe_own_output`),
    is a file, or lies under a file or a read-only folder. An overwrite of this output that a kill interrupted is
    finished first (`recover_interrupted_swap`). Nothing is created here: missing parents are made only once the plan
    has been checked."""
    recover_interrupted_swap(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a folder; remove it or choose another output folder")
    if output.exists() and not overwrite:
        raise OutputError(f"output '{output}' already exists; choose another folder or pass overwrite=True (--overwrite)")
    if output.exists():
        refuse_foreign_output(output)
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create '{output}': '{ancestor}' is a file, not a folder; choose another output folder")
    if not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write into '{ancestor}': permission denied; choose a writable output folder")


def describe_own_output(folder: Path) -> str | None:
    """What `folder` is, if this project wrote it (or it is empty): what `--overwrite` may replace. None otherwise.

    Recognised: an empty folder; a checkpoint whose config.json has model_type `mixturekit` (compose, add/remove
    experts, 0.1.0 checkpoints); a checkpoint with a config.json whose model card (README.md) carries the `moekit`
    (or 0.1's `mixturekit`) tag in its front matter (export, merge); a training run's folder, which holds
    `mixturekit_train.yaml`.
    """
    entries = list(folder.iterdir())
    if not entries:
        return "an empty folder"
    if (folder / TRAINING_RECORD).is_file():
        return f"a training run (it holds {TRAINING_RECORD})"
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type == "mixturekit":
        return "a composed checkpoint (config.json: model_type mixturekit)"
    if _card_tags(folder / "README.md") & {"moekit", "mixturekit"}:
        return f"a {model_type} checkpoint written by moekit (its model card is tagged moekit)"
    return None


def refuse_foreign_output(output: Path) -> None:
    """An OutputError naming what `output` holds, unless this project wrote it (`describe_own_output`)."""
    if describe_own_output(output) is not None:
        return
    entries = sorted(output.iterdir())
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:5])
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    raise OutputError(
        f"output '{output}' holds {shown}{more}, which moekit did not write; --overwrite (overwrite=True) replaces "
        "only an empty folder, a checkpoint moekit wrote (config.json with model_type mixturekit, or a model card "
        "tagged moekit) or a training run (mixturekit_train.yaml); move those files away or choose another output "
        "folder"
    )


def _card_tags(card: Path) -> set[str]:
    """The tags in a model card's YAML front matter (`tags:` then `- tag` lines), read without a YAML parser."""
    try:
        lines = card.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    if not lines or lines[0].strip() != "---":
        return set()
    tags, in_tags = set(), False
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("tags:"):
            in_tags = True
        elif in_tags and line.lstrip().startswith("- "):
            tags.add(line.lstrip()[2:].strip())
        elif in_tags:
            in_tags = False
    return tags


def new_staging_folder(output: Path) -> Path:
    """A fresh hidden folder beside `output` (its parents made now), named with our PID so that a later run can
    tell an abandoned one (its process gone) from one in use, and remove it."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder '{output.parent}': {error}; choose another output folder") from None
    recover_interrupted_swap(output)
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
    """Staging folders of composes that were killed (their process is gone), and old folders an overwrite set aside
    and could not remove, are removed before a new one starts (after `recover_interrupted_swap`, which may still
    need them)."""
    for prefix in (STAGING_PREFIX, RETIRED_PREFIX):
        for leftover in output.parent.glob(f"{prefix}{output.name}-*"):
            pid = leftover.name.removeprefix(f"{prefix}{output.name}-").split("-")[0]
            if pid.isdigit() and not _alive(pid):
                shutil.rmtree(leftover, ignore_errors=True)


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
    """Put the finished `staging` folder at `output`. An existing output is replaced by two renames (old aside, new
    in place) recorded first in a journal beside it, then the old folder is removed and the journal last: a kill at
    any step leaves the old or the new folder at `output`, or a journal that the next write to `output` completes
    (`recover_interrupted_swap`). If the second rename fails, the old folder is put back."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.parent / f"{RETIRED_PREFIX}{output.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    journal = _journal(output)
    _write_atomically(journal, json.dumps({"output": output.name, "new": staging.name, "old": retired.name,
                                           "pid": os.getpid()}) + "\n")
    _reached("journal written")
    output.rename(retired)
    _reached("old set aside")
    try:
        staging.rename(output)
    except OSError:
        retired.rename(output)
        journal.unlink()
        raise
    _reached("new in place")
    shutil.rmtree(retired, ignore_errors=True)
    _reached("old removed")
    journal.unlink()


def recover_interrupted_swap(output: Path) -> str | None:
    """Finish an overwrite of `output` that a kill interrupted (its journal is there and its process gone), and say
    so (a warning, also returned). The journal is written only once the new folder is complete, so the swap is
    rolled forward: the new folder goes to `output` and the old one is removed. Without a journal, a folder left by
    moekit 0.1's overwrite (which kept none) is reported, not guessed at. Returns None when there was nothing to do."""
    journal = _journal(output)
    for leftover in output.parent.glob(f"{journal.name}.*.tmp"):  # a journal killed while it was written
        if not _alive(leftover.name.removeprefix(f"{journal.name}.").removesuffix(".tmp")):
            leftover.unlink(missing_ok=True)
    if not journal.is_file():
        _report_legacy_leftovers(output)
        return None
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        new, old, pid = output.parent / record["new"], output.parent / record["old"], int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputError(f"the overwrite journal '{journal}' cannot be read ({error}); it records an overwrite of "
                          f"'{output}' that did not finish: check that folder and the hidden folders beside it, "
                          "then remove the journal") from None
    if pid != os.getpid() and _alive(str(pid)):
        return None  # that overwrite is still running
    if new.is_dir():  # killed before the new folder was in place
        if output.exists() and not old.exists():
            output.rename(old)
        if not output.exists():
            new.rename(output)
        what = "the new folder was moved into place and the old one removed"
    elif not output.exists() and old.is_dir():  # the new folder is gone (removed by hand): keep the old one
        old.rename(output)
        what = "its new folder was missing, so the old one was put back"
    else:
        what = "the new folder was already in place; the old one was removed"
    shutil.rmtree(old, ignore_errors=True)
    journal.unlink()
    message = (f"an overwrite of '{output}' was interrupted (process {pid} was killed) and is now finished: {what}")
    logger.warning(message)
    return message


def _report_legacy_leftovers(output: Path) -> None:
    """moekit 0.1 set the old folder aside as `.moekit-partial-old-*` and recorded nothing: say where one is while
    `output` is missing (a kill between its renames), rather than guess which output it was."""
    if output.exists():
        return
    for leftover in sorted(output.parent.glob(f"{LEGACY_RETIRED_PREFIX}*")):
        logger.warning(f"'{leftover}' is a folder an interrupted overwrite of moekit 0.1 set aside (the checkpoint it "
                       f"replaced); if it was '{output}', move it back there, else remove it")


def _journal(output: Path) -> Path:
    return output.parent / f"{JOURNAL_PREFIX}{output.name}.json"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.parent / f"{path.name}.{os.getpid()}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reached(step: str) -> None:
    """A point between two steps of `swap_into_place`, named for the tests that kill a process there."""


def card_front_matter(tags: Iterable[str]) -> str:
    """The YAML header every model card this project writes starts with (the Hub reads library and tags from it)."""
    return "---\nlibrary_name: transformers\ntags:\n" + "".join(f"- {tag}\n" for tag in tags) + "---\n"
