"""Execute a plan by streaming: one output tensor at a time, into size-bounded shards, appearing atomically.

Peak memory is about one output tensor (a stacked expert tensor is filled expert by expert), not the sum of the
models. The checkpoint is written into a hidden staging folder beside the output and renamed into place at the end;
an existing output is replaced only with `overwrite`, and only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import OutputError, RecipeError
from ..plan import CompositionPlan, TensorPlan, build_plan
from ..recipe import Recipe, load_recipe
from ..runtime.loader_files import AUTO_MAP
from ..runtime.stitch import build_stitches
from ..sources import ShardWriter, TensorSlot
from .model_card import write_model_card

STAGING_PREFIX = ".mixturekit-partial-"


def _new_router(plan: TensorPlan, recipe: Recipe) -> torch.Tensor:
    if plan.init == "zeros":
        return torch.zeros(plan.shape, dtype=plan.dtype)
    generator = torch.Generator().manual_seed((recipe.seed * 1_000_003 + zlib.crc32(plan.name.encode())) % 2**63)
    values = torch.randn(plan.shape, generator=generator, dtype=torch.float32) * recipe.router_init_std
    return values.to(plan.dtype)


def initial_stitch_values(plan: CompositionPlan) -> dict[str, torch.Tensor]:
    """bts: the stitches' initial tensors, built by the runtime's own `Stitch` with the recipe's seed."""
    config = plan.config
    if config.method != "bts":
        return {}
    sizes = [c.hidden_size for c in config.expert_config_objects()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.recipe.seed)
        stitches = build_stitches(config.stitch_layers_index, config.text_config.hidden_size, sizes)
    return {f"stitches.{name}": value for name, value in stitches.state_dict().items()}


def materialize_parts(
    plan: CompositionPlan, tensor: TensorPlan, stitch_values: dict[str, torch.Tensor] | None = None
) -> Iterator[torch.Tensor]:
    """The output tensor as consecutive parts: one part, or one expert's slice at a time for stacked tensors,
    so a stacked tensor is never whole in memory."""
    readers = [plan.models[i].reader for i in tensor.models]
    if tensor.origin == "new" and tensor.init == "stitch":
        yield (stitch_values or initial_stitch_values(plan))[tensor.name].to(tensor.dtype)
    elif tensor.origin == "new":
        yield _new_router(tensor, plan.recipe)
    elif tensor.origin == "copy":
        yield readers[0].get(tensor.sources[0]).to(tensor.dtype)
    elif tensor.origin == "average":
        total = readers[0].get(tensor.sources[0]).to(torch.float32)
        for reader in readers[1:]:
            piece = reader.get(tensor.sources[0])
            # a 16-bit piece is added as it is: the in-place add upcasts it element by element (exactly, as .to
            # would) without allocating and filling a float32 copy of it first
            total += piece if piece.dtype in (torch.bfloat16, torch.float16) else piece.to(torch.float32)
        yield total.div_(len(readers)).to(tensor.dtype)
    else:
        for reader in readers:
            for name in tensor.sources:  # consecutive row blocks of this expert's slice (gate rows, then up rows)
                piece = reader.get(name)
                yield (piece.t() if tensor.transpose else piece).to(tensor.dtype)


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


def _check_output(output: Path, overwrite: bool) -> None:
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


def _write_tensors(plan: CompositionPlan, staging: Path, progress: bool) -> None:
    stitch_values = initial_stitch_values(plan)
    by_name = {t.name: t for t in plan.tensors}
    slots = [TensorSlot(t.name, t.dtype, t.shape) for t in plan.tensors]
    write_sharded(staging, slots, lambda slot: materialize_parts(plan, by_name[slot.name], stitch_values),
                  plan.recipe.shard_bytes, progress, desc="composing")


def _hash_sources_in_background(plan: CompositionPlan) -> threading.Thread:
    """Start computing the model card's sha256 of every source weight file while the tensors are written.

    Hashing is a second full read of every input: done after the tensors, it added about 2 s to a 10 s compose of
    eight 0.5 GB experts (docs/performance.md). Reading and hashing release the GIL, so in a thread it overlaps the
    writing. A failure here is left for the
    main thread, which recomputes (and raises) when it writes the card; the thread is a daemon, so a compose that
    fails or is interrupted does not wait for it."""

    def work() -> None:
        for model in plan.models:
            try:
                model.file_hashes  # noqa: B018  (a cached_property: computing it is the point)
            except Exception:  # noqa: BLE001
                pass

    thread = threading.Thread(target=work, name="mixturekit-hash-sources", daemon=True)
    thread.start()
    return thread


def _write_side_files(plan: CompositionPlan, staging: Path, model_name: str) -> None:
    reference = plan.models[plan.reference]
    plan.config.architectures = ["MixtureKitForCausalLM"]
    if plan.recipe.auto_map:
        plan.config.auto_map = dict(AUTO_MAP)
    plan.config.save_pretrained(staging)  # with auto_map, also the loader files it names
    generation = reference.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, staging / "generation_config.json")
    for path in reference.tokenizer_files():
        shutil.copyfile(path, staging / path.name)
    (staging / "mixturekit_recipe.yaml").write_text(plan.recipe.to_yaml(), encoding="utf-8")
    write_model_card(plan, staging / "README.md", model_name)


def _swap_into_place(staging: Path, output: Path) -> None:
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


def compose(
    recipe: Recipe | dict | str | Path,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> Path:
    """Compose the recipe into a checkpoint folder and return its path."""
    recipe = load_recipe(recipe).with_output(output)
    if recipe.output is None:
        raise RecipeError("no output folder: set `output` in the recipe or pass one (-o/--output)")
    target = Path(recipe.output).expanduser().absolute()
    _check_output(target, overwrite)
    plan = build_plan(recipe, cache_dir=cache_dir)
    staging = new_staging_folder(target)
    try:
        hashing = _hash_sources_in_background(plan)
        _write_tensors(plan, staging, progress)
        hashing.join()
        _write_side_files(plan, staging, target.name)
        _swap_into_place(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        size = sum(t.nbytes for t in plan.tensors) / 1e9
        raise OutputError(
            f"writing the composed checkpoint '{target}' failed: {error}; nothing was written: free some space (it "
            f"needs about {size:.2f} GB) or choose another output folder"
        ) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
