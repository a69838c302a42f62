"""Experts given as PEFT LoRA adapters of the recipe's base: read as `W_base + scale · B A`, one tensor at a time.

Many users hold several LoRA adapters of one base rather than full checkpoints. An adapter source is a folder with
`adapter_config.json` and `adapter_model.safetensors`; it resolves to its base checkpoint with a reader that adds each
adapted weight's low-rank update when the tensor is read (in float32, then the base tensor's dtype), exactly as PEFT's
merge computes it, so no merged expert is ever written and peak memory stays about one tensor. Only plain LoRA on
Linear weights is read; every other PEFT variant is refused with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import SourceError
from .safetensors_io import CheckpointReader, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


class LoraAdapter:
    """The low-rank updates of one adapter, keyed by the base checkpoint's tensor names."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        self.base = config.get("base_model_name_or_path")
        refusal = _unsupported(config)
        if refusal:
            raise SourceError(f"model '{name}': the adapter in '{folder}' {refusal}; MixtureKit reads plain LoRA "
                              "adapters of Linear weights (merge other kinds into a full checkpoint first)")
        if not self.base:
            raise SourceError(f"model '{name}': '{folder / ADAPTER_CONFIG}' names no base_model_name_or_path")
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise SourceError(f"model '{name}': '{folder}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        rank, alpha = config["r"], config.get("lora_alpha", config["r"])
        self.scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        tensors = load_file(folder / ADAPTER_WEIGHTS)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, _, part = key.rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise SourceError(f"model '{name}': adapter tensor '{key}' is not a LoRA A/B weight of a Linear; "
                                  "MixtureKit reads plain LoRA adapters")
            pairs.setdefault(module.removeprefix("base_model.model.") + ".weight", {})[part[0]] = tensor
        incomplete = sorted(k for k, pair in pairs.items() if set(pair) != {"A", "B"})
        if incomplete:
            raise SourceError(f"model '{name}': the adapter has lora_A without lora_B (or the reverse) for {incomplete}")
        self.updates = pairs

    @property
    def adapted(self) -> list[str]:
        """The base tensor names this adapter changes."""
        return sorted(self.updates)

    def delta(self, base_name: str) -> torch.Tensor | None:
        pair = self.updates.get(base_name)
        return None if pair is None else (pair["B"].float() @ pair["A"].float()) * self.scale


def _unsupported(config: dict) -> str | None:
    """Why an adapter config is not plain LoRA on Linear weights, or None."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"is a {config.get('peft_type')} adapter, not LoRA"
    for key, why in (("use_dora", "uses DoRA (a magnitude vector beside the update)"),
                     ("fan_in_fan_out", "stores Conv1D-style (fan_in_fan_out) weights"),
                     ("modules_to_save", "trains whole modules besides LoRA (modules_to_save)"),
                     ("target_parameters", "adapts parameters directly (target_parameters)"),
                     ("rank_pattern", "sets per-module ranks (rank_pattern)"),
                     ("alpha_pattern", "sets per-module alphas (alpha_pattern)")):
        if config.get(key):
            return why
    if config.get("bias", "none") != "none":
        return f"trains biases (bias: {config['bias']})"
    return None


class AdaptedReader(CheckpointReader):
    """A base checkpoint's tensors with an adapter's updates added on read. PEFT names the updates by the model's
    parameters, so they apply to the tensors as the model loads them (`read_as`), after transformers' conversions."""

    def __init__(self, files: list[Path], adapter: LoraAdapter):
        super().__init__(files)
        self.adapter = adapter

    def read_as(self, model: nn.Module) -> None:
        super().read_as(model)
        missing = [name for name in self.adapter.adapted if name not in self.tensors]
        if missing:
            raise SourceError(f"the adapter in '{self.adapter.folder}' updates tensors its base does not have: "
                              f"{missing[:5]}; is '{self.adapter.base}' its base?")

    def adapted_names(self) -> set[str]:
        """The adapted tensors under the names this reader answers to."""
        return {name for name in self.tensors if name in self.adapter.updates}

    def get(self, name: str) -> torch.Tensor:
        tensor = super().get(name)
        delta = self.adapter.delta(name)
        return tensor if delta is None else (tensor.float() + delta).to(tensor.dtype)

    def stored(self, name: str) -> TensorInfo | None:
        return None if name in self.adapter.updates else super().stored(name)
