"""Two tiny files in a composed checkpoint, so that tools which take only a path load it through `moekit`.

lm-evaluation-harness, `pipeline`, TRL's scripts and other tools load a model by path, with `trust_remote_code=True`
at most. The checkpoint's `auto_map` names these files; each does nothing but import the installed `moekit` (no
model code is copied into the checkpoint). Where it is missing they say how to install it, and when the registry's
`mixturekit` (another project, import name `MixtureKit`) is what is installed, they say that too: its name is the
one users guess.
"""

from __future__ import annotations

from pathlib import Path

from ...distribution import OTHER_DISTRIBUTION, OTHER_IMPORT_NAME, install_instruction

# The file names are the checkpoint format's (model_type `mixturekit`), not the package's: checkpoints written before
# the package was renamed `moekit` name the same files.
AUTO_MAP = {
    "AutoConfig": "configuration_mixturekit.MixtureKitConfig",
    "AutoModelForCausalLM": "modeling_mixturekit.MixtureKitForCausalLM",
}
# A composition of image-text models also loads by path as one (`pipeline("image-text-to-text", model=path)`): the
# same class, which takes `pixel_values` where its base does.
IMAGE_TEXT_AUTO_MAP = {**AUTO_MAP, "AutoModelForImageTextToText": "modeling_mixturekit.MixtureKitForCausalLM"}


def auto_map_for(multimodal: bool) -> dict[str, str]:
    return dict(IMAGE_TEXT_AUTO_MAP if multimodal else AUTO_MAP)


def names_loader_files(auto_map: object) -> bool:
    """Whether a config's `auto_map` is one of ours (and so names the loader files)."""
    return auto_map in (AUTO_MAP, IMAGE_TEXT_AUTO_MAP)

_TEMPLATE = '''"""A MixtureKit checkpoint: its {what} come from the installed `moekit` package.

Loading with `trust_remote_code=True` runs only the import below. Once `moekit` is installed, `import moekit` before
`from_pretrained` is enough, without `trust_remote_code`.
"""

try:
    from moekit import {name}  # noqa: F401
except ImportError as error:
    import importlib.util

    _other = importlib.util.find_spec("{other_import}") is not None
    raise ImportError(
        "this checkpoint was composed by MixtureKit, whose Python package is `moekit`, and it is not installed"
        + (": the `{other_import}` package found here is the registry's `{other_distribution}`, a different project "
           "that cannot load it" if _other else "")
        + ". Install it: {install}"
    ) from error
'''

LOADER_FILES = {
    f"{module}.py": _TEMPLATE.format(what=what, name=name, other_import=OTHER_IMPORT_NAME,
                                     other_distribution=OTHER_DISTRIBUTION, install=install_instruction())
    for module, what, name in (("configuration_mixturekit", "configuration class", "MixtureKitConfig"),
                               ("modeling_mixturekit", "model class", "MixtureKitForCausalLM"))
}


def write_loader_files(folder: str | Path) -> None:
    for name, text in LOADER_FILES.items():
        (Path(folder) / name).write_text(text, encoding="utf-8")


def refresh_loader_files(folder: str | Path) -> list[str]:
    """Rewrite the loader files of a checkpoint that names them in its `auto_map`; return the files rewritten.

    Checkpoints written before the package became `moekit` hold loader files that import `mixturekit`: their weights
    and config load unchanged (`import moekit` first), and this makes `trust_remote_code=True` load them again."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if not names_loader_files(config.get("auto_map")):
        return []
    stale = [name for name, text in LOADER_FILES.items()
             if not (Path(folder) / name).is_file() or (Path(folder) / name).read_text(encoding="utf-8") != text]
    for name in stale:
        (Path(folder) / name).write_text(LOADER_FILES[name], encoding="utf-8")
    return stale
