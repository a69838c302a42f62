"""Offline text domains for the demo: Python source, English prose and arithmetic, each split train/validation.

Everything comes from the running interpreter (its standard library and `pydoc_data`) or a seeded generator, so the
demo needs no download and gives the same text for the same seed on the same Python installation.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from pydoc_data.topics import topics as _PYDOC_TOPICS

DOMAIN_NAMES: tuple[str, ...] = ("code", "prose", "arithmetic")


@dataclass(frozen=True)
class Domain:
    """One domain's documents, split by document so validation text is never trained on."""

    name: str
    train: list[str]
    validation: list[str]


def _take_until(documents: list[str], budget: int, max_document_chars: int) -> list[str]:
    """Documents in order, each cut to `max_document_chars` so one long file cannot dominate, until `budget`."""
    taken, total = [], 0
    for document in documents:
        if total >= budget:
            break
        document = document[:max_document_chars]
        if document.strip():
            taken.append(document)
            total += len(document)
    return taken


def _split(name: str, documents: list[str], validation_fraction: float) -> Domain:
    count = max(1, round(len(documents) * validation_fraction))
    if len(documents) < 2:
        raise ValueError(f"domain '{name}' needs at least 2 documents to split, got {len(documents)}")
    return Domain(name, train=documents[:-count], validation=documents[-count:])


def code_documents(rng: random.Random) -> list[str]:
    """Python standard-library modules (the folder of `os`), in a seeded order; sorted first so the order is stable."""
    folder = Path(os.__file__).parent
    paths = sorted(folder.glob("*.py"))
    rng.shuffle(paths)
    documents = []
    for path in paths:
        try:
            documents.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return documents


def prose_documents(rng: random.Random) -> list[str]:
    """The English topic pages of Python's interactive help, in a seeded order."""
    documents = [_PYDOC_TOPICS[key] for key in sorted(_PYDOC_TOPICS)]
    rng.shuffle(documents)
    return documents


def arithmetic_line(rng: random.Random) -> str:
    """One true equation; small operands for `*` so the products stay learnable by a tiny model."""
    operator = rng.choice("+-*")
    if operator == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} {operator} {b} = {a + b if operator == '+' else a - b}"


def arithmetic_documents(rng: random.Random, count: int, lines_per_document: int = 40) -> list[str]:
    return ["\n".join(arithmetic_line(rng) for _ in range(lines_per_document)) + "\n" for _ in range(count)]


def build_domains(
    seed: int = 0, chars_per_domain: int = 240_000, max_document_chars: int = 12_000, validation_fraction: float = 0.12
) -> dict[str, Domain]:
    """The three domains with about `chars_per_domain` characters each (train and validation together)."""
    code = _take_until(code_documents(random.Random(f"code-{seed}")), chars_per_domain, max_document_chars)
    prose = _take_until(prose_documents(random.Random(f"prose-{seed}")), chars_per_domain, max_document_chars)
    # An arithmetic line is about 12 characters; 40 lines make one ~480-character document.
    arithmetic = arithmetic_documents(random.Random(f"arithmetic-{seed}"), max(4, chars_per_domain // 480))
    return {
        "code": _split("code", code, validation_fraction),
        "prose": _split("prose", prose, validation_fraction),
        "arithmetic": _split("arithmetic", arithmetic, validation_fraction),
    }
