"""Turn a recipe's `source` (local folder, GGUF file, Hub id) into a local folder of safetensors and a config."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ..errors import SourceError
from ..recipe import ModelSource
from .gguf import convert_gguf, convert_pickle
from .local_files import PICKLE_SUFFIXES, file_sha256
from .lora_adapter import AdaptedReader, LoraAdapter, is_adapter_folder
from .paths import looks_like_local_path
from .safetensors_io import CheckpointReader

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


@dataclass
class LocalModel:
    """A source model resolved to a local folder: its config, weight files and where it came from."""

    name: str
    folder: Path
    weight_files: list[Path]
    config: PretrainedConfig
    origin: str
    revision: str | None = None
    converted_from: str | None = None
    _reader: CheckpointReader | None = field(default=None, repr=False)

    @property
    def reader(self) -> CheckpointReader:
        if self._reader is None:
            self._reader = CheckpointReader(self.weight_files)
        return self._reader

    @cached_property
    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, for the model card."""
        return {path.name: file_sha256(path) for path in self.weight_files}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its index names, else every `*.safetensors` in it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SourceError(f"'{index}' is not a valid safetensors index: {error}") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SourceError(f"'{index}' lists shard files that do not exist: {missing}")
        return files
    return sorted(folder.glob("*.safetensors"))


def _load_config(folder: Path, name: str) -> PretrainedConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"model '{name}': folder '{folder}' has no config.json; a source is a Hugging Face model folder "
            "(config.json + *.safetensors), a .gguf file, or a Hub id"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise SourceError(
            f"model '{name}': '{config_path}' is not valid JSON: {error}; fix or re-download config.json"
        ) from None
    if "auto_map" in raw:
        raise SourceError(
            f"model '{name}' needs custom code (its config has `auto_map`); MixtureKit never sets "
            "trust_remote_code. Use a model whose architecture `transformers` ships."
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        raise SourceError(f"model '{name}': cannot read '{config_path}': {error}") from None


def _local_folder(spec: ModelSource, cache_dir: Path | None) -> tuple[Path, str, str | None]:
    """Return (folder, origin, converted_from) for a source that is a path or a Hub id."""
    path = Path(spec.source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir), f"gguf:{path}", str(path)
    if path.is_dir():
        if spec.gguf_file is not None:
            gguf = path / spec.gguf_file
            if not gguf.is_file():
                raise SourceError(f"model '{spec.name}': gguf_file '{spec.gguf_file}' is not in '{path}'")
            return convert_gguf(gguf, cache_dir), f"gguf:{gguf}", str(gguf)
        if not weight_files(path) and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0], cache_dir), f"gguf:{ggufs[0]}", str(ggufs[0])
            if len(ggufs) > 1:
                raise SourceError(
                    f"model '{spec.name}': '{path}' holds several .gguf files {[g.name for g in ggufs]}; "
                    "name one with `gguf_file`"
                )
        return path, f"local:{path.resolve()}", None
    if path.exists():
        raise SourceError(f"model '{spec.name}': '{path}' is neither a folder nor a .gguf file")
    if looks_like_local_path(spec.source, (".gguf",)):
        raise SourceError(
            f"model '{spec.name}': source path '{spec.source}' does not exist (a source is a local folder, "
            "a .gguf file, or a Hub id such as 'HuggingFaceTB/SmolLM2-135M')"
        )
    return _hub_folder(spec), f"hub:{spec.source}", None


def _hub_folder(spec: ModelSource) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:  # not in the local cache: fall through to a download, unless offline
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise SourceError(
            f"model '{spec.name}': '{spec.source}' is not a local path and is not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set; download it first or give a local folder"
        )
    try:
        return Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=patterns))
    except Exception as error:
        raise SourceError(
            f"model '{spec.name}': '{spec.source}' is not a local path, and the Hub could not provide it "
            f"({type(error).__name__}: {error}); check the id, your network, or give a local folder"
        ) from None


def resolve_source(spec: ModelSource, cache_dir: Path | None = None, allow_pickle: bool = False) -> LocalModel:
    """Find the model on disk (converting GGUF, or pickle with `allow_pickle`, once into a cache) and read its
    config; no weights are read. A PEFT LoRA adapter folder resolves to its base, read with the updates added."""
    if is_adapter_folder(Path(spec.source).expanduser()):
        return _resolve_adapter(spec, cache_dir, allow_pickle)
    folder, origin, converted_from = _local_folder(spec, cache_dir)
    files = weight_files(folder)
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and allow_pickle:
            folder, converted_from = convert_pickle(folder, pickles, cache_dir), str(folder)
            files = weight_files(folder)
        elif pickles:
            raise SourceError(
                f"model '{spec.name}': '{folder}' has only pickle weights {[p.name for p in pickles]}, which can "
                "run code when loaded; MixtureKit reads safetensors. Convert them, or set `allow_pickle: true` in "
                "the recipe to read them with torch.load(weights_only=True)"
            )
        else:
            raise SourceError(
                f"model '{spec.name}': '{folder}' has no *.safetensors weight files; re-save it with "
                "save_pretrained (safetensors), or give a .gguf file or a Hub id"
            )
    config = _load_config(folder, spec.name)
    return LocalModel(spec.name, folder, files, config, origin, spec.revision, converted_from)


def _resolve_adapter(spec: ModelSource, cache_dir: Path | None, allow_pickle: bool) -> LocalModel:
    """The adapter's base, resolved like any source, with a reader that adds the adapter's updates."""
    folder = Path(spec.source).expanduser()
    adapter = LoraAdapter(folder, spec.name)
    base = resolve_source(ModelSource(name=spec.name, source=adapter.base), cache_dir, allow_pickle)
    return LocalModel(spec.name, base.folder, base.weight_files, base.config, f"lora:{folder.absolute()}",
                      spec.revision, base.converted_from, AdaptedReader(base.weight_files, adapter))
