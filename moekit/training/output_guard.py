"""A training run owns its output folder: a new run never writes into another run's folder, and `--resume`
continues only the run that the folder's recorded config describes.

The config is recorded as `mixturekit_train.yaml` in the output when a run starts. Resuming may raise `max_steps`
and change how often it saves or logs; any other difference would mix two runs' checkpoints, so it is refused with
the fields that differ.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import OutputError, TrainingError
from ..sources.checkpoint_folder import (
    TRAINING_RECORD, new_staging_folder, recover_interrupted_swap, refuse_foreign_output, swap_into_place,
)
from .config import TrainConfig

RECORD = TRAINING_RECORD
CHANGEABLE_ON_RESUME = frozenset({"max_steps", "save_steps"})


def check_output(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an output that belongs to another run (or, with `resume`, to another config). Every
    rank checks before the main process writes anything there (`begin_run`)."""
    from .data_parallel import wait_for_all_ranks

    _check(config, resume, overwrite)
    wait_for_all_ranks()


def _check(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    output = Path(config.output)
    recover_interrupted_swap(output)
    if resume and overwrite:
        raise TrainingError("--resume continues the run in the output folder and --overwrite replaces it: pass one")
    if resume:
        _check_same_run(config, output)
        return
    if output.exists() and not output.is_dir():
        raise TrainingError(f"output '{output}' exists and is not a folder; choose another output folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise TrainingError(
            f"output '{output}' already holds a run; choose another output folder, pass --resume to continue that "
            "run, or --overwrite to replace it"
        )
    if output.is_dir() and overwrite:
        try:
            refuse_foreign_output(output)
        except OutputError as error:
            raise TrainingError(str(error)) from None


def begin_run(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Once the model and the data have loaded: on the main process, record the config in a new run folder at the
    output, swapped in place of the old run (`overwrite`) as a checkpoint is, so a kill never leaves the output
    empty; every rank waits for it."""
    from .data_parallel import is_main_process, wait_for_all_ranks

    output = Path(config.output)
    if is_main_process() and not resume:
        record = yaml.safe_dump(config.model_dump(), sort_keys=True)
        if output.is_dir() and overwrite and any(output.iterdir()):
            staging = new_staging_folder(output)
            (staging / RECORD).write_text(record, encoding="utf-8")
            swap_into_place(staging, output)
        else:
            output.mkdir(parents=True, exist_ok=True)
            (output / RECORD).write_text(record, encoding="utf-8")
    wait_for_all_ranks()


def _check_same_run(config: TrainConfig, output: Path) -> None:
    record = output / RECORD
    if not record.is_file():
        raise TrainingError(
            f"--resume: '{output}' holds no run started by `moekit train` (no {RECORD}); start a new run there "
            "without --resume, or point `output` at the run to continue"
        )
    recorded = yaml.safe_load(record.read_text(encoding="utf-8")) or {}
    current = config.model_dump()
    differing = sorted(k for k in set(recorded) | set(current)
                       if k not in CHANGEABLE_ON_RESUME and recorded.get(k) != current.get(k))
    if differing:
        details = "; ".join(f"{k}: {recorded.get(k)!r} in the run, {current.get(k)!r} now" for k in differing)
        raise TrainingError(
            f"--resume continues the run in '{output}', which was started with another config ({details}); resume "
            f"with that config (only {', '.join(sorted(CHANGEABLE_ON_RESUME))} may change), or train into a new "
            "output folder"
        )
