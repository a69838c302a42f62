"""Training and evaluation data from `datasets`: local JSON/JSONL/Parquet/CSV/text files or a dataset name."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, load_dataset

from .errors import TrainingError
from .sources.paths import looks_like_local_path

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def check_data_source(source: str | Path) -> Path:
    """The source as a path; an error at once, naming it, when it can only be a local file and does not exist."""
    path = Path(source).expanduser()
    if not path.exists() and looks_like_local_path(source, tuple(_FORMATS)):
        raise TrainingError(
            f"data file '{source}' does not exist (looked for '{path.absolute()}'); check the path, or give a "
            "dataset name such as 'owner/name'"
        )
    return path


def load_data(source: str | Path, split: str = "train", required_columns: tuple[str, ...] = ("text",)) -> Dataset:
    """A `datasets.Dataset` from a local file (by its suffix) or a dataset name; checks it is non-empty and has the
    columns the stage needs."""
    path = check_data_source(source)
    try:
        if path.exists():
            if path.suffix not in _FORMATS:
                raise TrainingError(f"'{path}': unknown data format; use one of {sorted(_FORMATS)} or a dataset name")
            dataset = load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            dataset = load_dataset(str(source), split=split)
    except TrainingError:
        raise
    except Exception as error:
        bad_line = _first_line_that_is_not_json(path) if path.suffix == ".jsonl" and path.is_file() else None
        if bad_line is not None:
            number, reason = bad_line
            raise TrainingError(
                f"'{path}' line {number} is not JSON ({reason}): a .jsonl file holds one JSON object per line, such "
                f"as {{\"{required_columns[0] if required_columns else 'text'}\": \"...\"}}; plain text goes in a .txt file"
            ) from None
        raise TrainingError(f"cannot load data '{source}': {type(error).__name__}: {error}") from None
    if len(dataset) == 0:
        raise TrainingError(f"data '{source}' is empty")
    missing = [c for c in required_columns if c not in dataset.column_names]
    if missing:
        raise TrainingError(
            f"data '{source}' lacks the column(s) {missing} this stage needs; it has {dataset.column_names}"
        )
    return dataset


def _first_line_that_is_not_json(path: Path) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object (number from 1, and why), if any."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                return number, error.msg
            if not isinstance(value, dict):
                return number, f"a {type(value).__name__}, not an object"
    return None


def token_blocks(dataset: Dataset, tokenizer, block_size: int, text_column: str = "text") -> Dataset:
    """Tokenize, concatenate with EOS between documents, and cut into `input_ids` blocks of `block_size` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in dataset[text_column]:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    count = len(stream) // block_size
    if count == 0:
        raise TrainingError(f"the data holds {len(stream)} tokens, fewer than one block of {block_size}")
    return Dataset.from_dict({"input_ids": [stream[i * block_size:(i + 1) * block_size] for i in range(count)]})


def named_data_sources(data: list[str]) -> dict[str, str]:
    """`--data` values as {name: source}: NAME=FILE, or a file or dataset name named by its stem."""
    return dict(item.split("=", 1) if "=" in item else (Path(item).stem, item) for item in data)
