"""Execute a plan by streaming: one output tensor at a time, into size-bounded shards, appearing atomically.

Peak memory is about one output tensor (a stacked expert tensor is filled expert by expert), not the sum of the
models. The checkpoint is written into a hidden staging folder beside the output and renamed into place at the end;
an existing output is replaced only with `overwrite`, and only after the new one is complete.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib
from pathlib import Path
from typing import Iterator

import torch

from ..errors import RecipeError
from ..plan import CompositionPlan, TensorPlan, build_plan
from ..recipe import Recipe, load_recipe
from ..runtime.assembly.loader_files import auto_map_for
from ..runtime.bts.stitch import build_stitches
from ..sources import TensorSlot
from ..sources.safetensors_io import FileSlice, TensorInfo, dtype_nbytes, read_exactly
from ..sources.checkpoint_folder import (
    check_output_folder, copy_processor_files, copy_tokenizer_files, staged_output, write_sharded,
)
from .model_card import write_model_card


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
        stitches = build_stitches(config.stitch_layers_index, config.hidden_size, sizes)
    return {f"stitches.{name}": value for name, value in stitches.state_dict().items()}


def materialize_parts(
    plan: CompositionPlan, tensor: TensorPlan, stitch_values: dict[str, torch.Tensor] | None = None,
    streaming: bool = False,
) -> Iterator[torch.Tensor | FileSlice]:
    """The output tensor as consecutive parts: one part, or one expert's slice at a time for stacked tensors,
    so a stacked tensor is never whole in memory.

    With `streaming` (what the composer's shard writer takes), a part may also be a `FileSlice` (bytes of a source file
    that are the output as they are: a copied or stacked tensor of the same dtype), and an averaged tensor comes in
    blocks that reuse one buffer: each part is valid only until the next one is asked for."""
    readers = [plan.models[i].reader for i in tensor.models]
    if streaming and tensor.origin == "average":
        stored = [reader.stored(tensor.sources[0]) for reader in readers]
        if (tensor.dtype.is_floating_point
                and all(info is not None and info.dtype.is_floating_point for info in stored)):
            yield from average_in_blocks(stored, tensor.dtype)
            return
    if tensor.origin == "new" and tensor.init == "stitch":
        yield (stitch_values or initial_stitch_values(plan))[tensor.name].to(tensor.dtype)
    elif tensor.origin == "new":
        yield _new_router(tensor, plan.recipe)
    elif tensor.origin == "copy":
        stored = readers[0].stored(tensor.sources[0]) if streaming else None
        if stored is not None and stored.dtype == tensor.dtype:
            yield FileSlice(stored.file, stored.start, stored.nbytes, stored.dtype)
        else:
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
                stored = reader.stored(name) if streaming and not tensor.transpose else None
                if stored is not None and stored.dtype == tensor.dtype:
                    yield FileSlice(stored.file, stored.start, stored.nbytes, stored.dtype)
                    continue
                piece = reader.get(name)
                yield (piece.t() if tensor.transpose else piece).to(tensor.dtype)


# Elements per block when averaging: the float32 sum (128 KiB) and one source block stay in the CPU's cache, and torch
# does not split an elementwise op this small (its grain size) over threads. Split, it waits at every op for the other
# threads: on a 2-core machine where the source-hashing thread or another process holds a core, blocks of 2**18
# elements made averaging 10x slower than this.
AVERAGE_BLOCK = 2**15


def average_in_blocks(sources: list[TensorInfo], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The mean of the stored tensors `sources` (same shape), block by block through reused buffers.

    Bit for bit what averaging whole tensors gives (the float32 sum in the same order, then one division and one
    rounding per element), but each block is read straight from the files into a buffer that is already resident,
    summed while it is in cache, and written out before the next: no tensor-sized float32 copy, no fresh memory per
    source tensor."""
    sizes = [dtype_nbytes(info.dtype) for info in sources]
    numel = sources[0].nbytes // sizes[0]
    block = max(1, min(numel, AVERAGE_BLOCK))
    raw = torch.empty(block * max(sizes), dtype=torch.uint8)
    total = torch.empty(block, dtype=torch.float32)
    out = total if dtype == torch.float32 else torch.empty(block, dtype=dtype)
    handles = {}
    try:
        for info in sources:
            if info.file not in handles:
                handles[info.file] = open(info.file, "rb", buffering=0)
        for begin in range(0, numel, block):
            count = min(block, numel - begin)
            for index, (info, size) in enumerate(zip(sources, sizes)):
                view = raw[: count * size]
                read_exactly(handles[info.file].fileno(), memoryview(view.numpy()), info.start + begin * size, info)
                piece = view.view(info.dtype)
                if index == 0:
                    total[:count].copy_(piece)
                elif info.dtype in (torch.bfloat16, torch.float16, torch.float32):
                    total[:count] += piece
                else:
                    total[:count] += piece.to(torch.float32)
            total[:count].div_(len(sources))
            if out is not total:
                out[:count].copy_(total[:count])
            yield out[:count]
    finally:
        for handle in handles.values():
            handle.close()


def _write_tensors(plan: CompositionPlan, staging: Path, progress: bool) -> None:
    stitch_values = initial_stitch_values(plan)
    by_name = {t.name: t for t in plan.tensors}
    slots = [TensorSlot(t.name, t.dtype, t.shape) for t in plan.tensors]
    write_sharded(staging, slots,
                  lambda slot: materialize_parts(plan, by_name[slot.name], stitch_values, streaming=True),
                  plan.recipe.shard_bytes, progress, desc="composing")


def _hash_sources_in_background(plan: CompositionPlan) -> list[threading.Thread]:
    """Start computing the model card's sha256 of every source weight file while the tensors are written.

    Hashing is a second full read of every input: done after the tensors, it added about 2 s to a 10 s compose of
    eight 0.5 GB experts (docs/performance.md). Reading and hashing release the GIL, so in threads it overlaps the
    writing. One source per thread, as many threads as there are cores beyond the writer's (one on a 2-core machine,
    where a second would take the writer's core; up to one per source on a 16-core GPU host, where a single thread
    hashing 9.6 GB would be the last thing compose waits for). A failure here is left for the main thread, which
    recomputes (and raises) when it writes the card; the threads are daemons, so a compose that fails or is
    interrupted does not wait for them."""
    pending = queue.SimpleQueue()
    for model in plan.models:
        pending.put(model)

    def work() -> None:
        while True:
            try:
                model = pending.get_nowait()
            except queue.Empty:
                return
            try:
                model.file_hashes  # noqa: B018  (a cached_property: computing it is the point)
            except Exception:  # noqa: BLE001
                pass

    count = max(1, min(len(plan.models), (os.cpu_count() or 2) - 1))
    threads = [threading.Thread(target=work, name=f"moekit-hash-sources-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _write_side_files(plan: CompositionPlan, staging: Path, model_name: str) -> None:
    reference = plan.models[plan.reference]
    plan.config.architectures = ["MixtureKitForCausalLM"]
    if plan.recipe.auto_map:
        plan.config.auto_map = auto_map_for(plan.config.is_multimodal)
    plan.config.save_pretrained(staging)  # with auto_map, also the loader files it names
    copy_tokenizer_files(reference.folder, staging)
    if plan.config.is_multimodal:  # the image processor and the processor's settings (image tokens, chat template)
        for folder in _processor_folders(plan):
            copy_processor_files(folder, staging)
    (staging / "mixturekit_recipe.yaml").write_text(plan.recipe.to_yaml(), encoding="utf-8")
    write_model_card(plan, staging / "README.md", model_name)


def _processor_folders(plan: CompositionPlan) -> list[Path]:
    """Where the processor comes from, the last one's files winning: the reference model (bts: the hub), then the base
    of a routed composition, where the recipe has one (the model the experts were fine-tuned from)."""
    folders = [plan.models[plan.reference].folder]
    base = plan.recipe.base
    if plan.config.method != "bts" and base is not None:
        folders += [model.folder for model in plan.models if model.name == base.name]
    return folders


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
    check_output_folder(target, overwrite)
    plan = build_plan(recipe, cache_dir=cache_dir)
    if recipe.router_init == "data":
        return _compose_with_fitted_routers(plan, target, overwrite, progress)
    _write_checkpoint(plan, target, target.name, progress)
    return target


def _write_checkpoint(plan: CompositionPlan, folder: Path, model_name: str, progress: bool) -> None:
    """The plan's tensors and side files into `folder`, appearing whole or not at all; sources hashed meanwhile."""
    with staged_output(folder, "composed checkpoint", sum(t.nbytes for t in plan.tensors)) as staging:
        hashing = _hash_sources_in_background(plan)
        _write_tensors(plan, staging, progress)
        for thread in hashing:
            thread.join()
        _write_side_files(plan, staging, model_name)


def _compose_with_fitted_routers(plan: CompositionPlan, target: Path, overwrite: bool, progress: bool) -> Path:
    """`router_init: data`: compose into a hidden folder beside the output, fit every router from each expert's
    sample there (`editing.router_fit`), and write the output from it with the fitted rows, atomically."""
    import shutil

    from ..editing.router_fit import fit_routers_from_data
    from ..sources.checkpoint_folder import new_staging_folder

    recipe = plan.recipe
    data = {name: Path(path).expanduser() for name, path in (recipe.router_data or {}).items()}
    missing = [f"{name}: {path}" for name, path in data.items() if not path.is_file()]
    if missing:
        raise RecipeError(f"router_data files not found ({'; '.join(missing)}); give a .txt or .jsonl file of each "
                          "expert's domain texts")
    unfitted = new_staging_folder(target) / "unfitted"
    try:
        _write_checkpoint(plan, unfitted, target.name, progress)
        return fit_routers_from_data(unfitted, data, target, overwrite=overwrite, progress=progress, record=False,
                                     **({"limit": recipe.router_data_texts} if recipe.router_data_texts else {}))
    finally:
        shutil.rmtree(unfitted.parent, ignore_errors=True)
