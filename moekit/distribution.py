"""What this project is called where users install and import it, and the one install instruction it prints.

The registry's `mixturekit` (import name `MixtureKit`) is a different project: the original MixtureKit authors'
release of the paper's code. Ours installs and imports as `moekit`, so the two never share a distribution, a console
script or, on a case-insensitive file system, a folder in site-packages. Every instruction the package prints or
writes into a checkpoint comes from `install_instruction`, so a test can hold them all to pyproject.toml's name.
"""

DISTRIBUTION = "moekit"
# The release: its one home (pyproject.toml reads it from here; `moekit.__version__` is this).
VERSION = "0.2.0"
# The other project's names, to recognise it when it is installed instead of ours.
OTHER_DISTRIBUTION = "mixturekit"
OTHER_IMPORT_NAME = "MixtureKit"

# `moekit` is not on the package registry yet: until it is, an instruction naming it there would find nothing (or
# whatever someone else publishes under the name), so instructions send users to the repository. Flip on release.
PUBLISHED_ON_REGISTRY = False


def install_instruction(extra: str = "") -> str:
    """How to install this project (with an optional extra, e.g. "gguf"), in one line a user can follow."""
    suffix = f"[{extra}]" if extra else ""
    if PUBLISHED_ON_REGISTRY:
        return f"`pip install '{DISTRIBUTION}{suffix}'`"
    return (f"`pip install '.{suffix}'` in a clone of MixtureKit's repository (the distribution `{DISTRIBUTION}` is "
            f"not on the package registry yet; the registry's `{OTHER_DISTRIBUTION}` is another project)")
