#!/usr/bin/env bash
# bench/accelerate_runs.py on a lent GPU through the device tool (64 MiB per call): first
# `bash examples/btx_smollm2/run_on_device.sh stash` carrying .carry/btx_smollm2/smollm2.gguf.part0, then, while the
# machine is warm, `bash bench/accelerate_runs.sh [--only plain,fsdp2]` carrying .whl (pydantic, datasets, dill,
# multiprocess, trl, hjson, gguf, deepspeed built with DS_BUILD_OPS=0) and .carry/btx_smollm2 minus part0.
# Runs finished by an earlier call on the same machine are reused.
set -euo pipefail
STASH=/root/btx_smollm2_stash
DATA=.carry/btx_smollm2
[ -f "$STASH/smollm2.gguf.part0" ] || { echo "no $STASH/smollm2.gguf.part0: run the stash call first"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || cat "$STASH/smollm2.gguf.part0" "$DATA/smollm2.gguf.part1" > "$GGUF"
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 bench/accelerate_runs.py --gguf "$GGUF" --data "$DATA" --workdir /root/accelerate_runs --out "$OUT" "$@" \
    2>&1 | tee "$OUT/log.txt" | grep -v "it/s\]\|s/it\]"
