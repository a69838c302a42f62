"""Before loading: a composed checkpoint's tensor headers against what its config builds, so that a mismatch is
named and a missing router is an error instead of a random one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError
from .config import MixtureKitConfig

def saved_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors `save_pretrained` writes for `model`, by name and shape: its state dict less the tied weights."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def check_checkpoint(folder: Path, model_class: type[nn.Module]) -> None:
    """Compare a composed checkpoint's tensor headers with what its config builds (as `model_class`); raise naming
    the first problems."""
    from ...sources.resolve import weight_files
    from ...sources.safetensors_io import CheckpointReader

    config = MixtureKitConfig.from_pretrained(folder)
    files = weight_files(folder)
    if not files:
        return
    with torch.device("meta"):
        expected_model = model_class(config)
    reader = CheckpointReader(files)
    reader.read_as(expected_model)  # names as transformers loads them: its save reverts renamings of the families
    stored = reader.tensors
    expected = saved_tensor_shapes(expected_model)
    problems = [f"tensor '{n}' has shape {list(stored[n].shape)}, the config needs {list(shape)}"
                for n, shape in expected.items() if n in stored and stored[n].shape != shape]
    missing = [n for n in expected if n not in stored and not n.endswith(".inv_freq")]
    needed_by_model = {n for n, _ in expected_model.named_parameters()}
    problems += [f"tensor '{n}' is missing" for n in missing if n in needed_by_model]
    if problems:
        raise CheckpointError(
            f"checkpoint '{folder}' does not match its config (expert_names lists {config.num_experts} experts: "
            f"{', '.join(config.expert_names)}): {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; recompose it with moekit "
            "compose, or restore the config.json it was written with"
        )
