"""Whether a name can only mean a local file or folder, so that a missing one is an error at once, naming the path,
instead of a Hub look-up that retries for a minute and then reports a network error."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def looks_like_local_path(name: str | Path, local_suffixes: tuple[str, ...] = ()) -> bool:
    """True where `name` cannot be a Hub id: it starts with '/', '.' or '~', has more than one '/', ends with one
    of `local_suffixes` (a file format), or is not a valid `name` / `owner/name` id at all."""
    text = str(name)
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith(local_suffixes)
            or not HUB_ID.match(text))
