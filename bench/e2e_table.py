"""The Speed issue's table from bench/end_to_end.py JSON files: one column per method and file, ratios against the
dense model of the same run.

    python bench/e2e_table.py docs/results/speed-h200/e2e-shapes.json [--label after] [more.json --label before ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(shape: dict) -> dict[str, dict[str, float]]:
    """Row name -> {method: ratio against dense} for one shape of one run."""
    table: dict[str, dict[str, float]] = {}
    for row in shape.get("forward", []):
        tokens = f"{row['batch']}x{row['length']}"
        for method in ("btx", "traditional"):
            for key, label in (("fwd", "forward"), ("fwdbwd", "forward+backward"),
                               ("fwdbwd_peak", "peak memory fwd+bwd"), ("compiled_fwdbwd", "torch.compile fwd+bwd")):
                if f"{method}_{key}_ratio" in row:
                    table.setdefault(f"{label}, {tokens}", {})[method] = row[f"{method}_{key}_ratio"]
    training = {row["case"]: row["tokens_per_s"] for row in shape.get("training", [])}
    equal = next((v for k, v in training.items() if k.startswith("dense equal active")), None)
    for method in ("btx", "traditional"):
        if equal and f"{method}, routers only" in training:
            table.setdefault("router-only training tokens/s vs dense of equal active", {})[method] = (
                training[f"{method}, routers only"] / equal)
    for row in shape.get("generation", []):
        label = f"generate() batch {row['batch']}, tokens/s vs dense"
        if row.get("cache_implementation"):
            label = f"generate(cache_implementation=\"{row['cache_implementation']}\") batch {row['batch']}"
        for method in ("btx", "traditional"):
            table.setdefault(label, {})[method] = row[f"{method}_ratio"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--label", action="append", default=[], help="a column label per file, in order")
    args = parser.parse_args()
    columns, tables = [], {}
    for index, path in enumerate(args.files):
        run = json.loads(path.read_text())
        label = args.label[index] if index < len(args.label) else path.stem
        for shape in run["shapes"]:
            for row, values in rows_of(shape).items():
                for method, ratio in values.items():
                    column = f"{shape['shape']} {method} ({label})"
                    if column not in columns:
                        columns.append(column)
                    tables.setdefault(row, {})[column] = ratio
    print("| row | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for row, values in tables.items():
        print(f"| {row} | " + " | ".join(f"{values[c]:.2f}" if c in values else "" for c in columns) + " |")


if __name__ == "__main__":
    main()
