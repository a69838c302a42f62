"""Two tiny files in a composed checkpoint, so that tools which take only a path load it through `mixturekit`.

lm-evaluation-harness, `pipeline`, TRL's scripts and other tools load a model by path, with `trust_remote_code=True`
at most. The checkpoint's `auto_map` names these files; each does nothing but import the installed `mixturekit`
(no model code is copied into the checkpoint), and says `pip install mixturekit` where it is missing.
"""

from __future__ import annotations

from pathlib import Path

AUTO_MAP = {
    "AutoConfig": "configuration_mixturekit.MixtureKitConfig",
    "AutoModelForCausalLM": "modeling_mixturekit.MixtureKitForCausalLM",
}

_TEMPLATE = '''"""A MixtureKit checkpoint: its {what} come from the installed `mixturekit` package.

Loading with `trust_remote_code=True` runs only the import below. `pip install mixturekit` provides it; once it is
installed, `import mixturekit` before `from_pretrained` is enough, without `trust_remote_code`.
"""

try:
    from mixturekit import {name}  # noqa: F401
except ImportError as error:
    raise ImportError(
        "this checkpoint was composed by MixtureKit: `pip install mixturekit` to load it, then `import mixturekit`"
    ) from error
'''

LOADER_FILES = {
    "configuration_mixturekit.py": _TEMPLATE.format(what="configuration class", name="MixtureKitConfig"),
    "modeling_mixturekit.py": _TEMPLATE.format(what="model class", name="MixtureKitForCausalLM"),
}


def write_loader_files(folder: str | Path) -> None:
    for name, text in LOADER_FILES.items():
        (Path(folder) / name).write_text(text, encoding="utf-8")
