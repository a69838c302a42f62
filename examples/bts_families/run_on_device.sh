#!/usr/bin/env bash
# The cross-family BTS demonstration on a lent GPU through the device tool, as examples/btx_smollm2/run_on_device.sh
# runs the SmolLM2 reproduction: the tool carries at most 64 MiB per call, so SmolLM2's GGUF (94 MB) travels in two
# halves made by `python examples/btx_smollm2/prepare.py --out .carry/btx_smollm2 --split-model`.
# Call 1: `bash examples/bts_families/run_on_device.sh stash` carrying .carry/btx_smollm2/smollm2.gguf.part0;
# call 2, while the machine is still warm: `bash examples/bts_families/run_on_device.sh run [options]` carrying .whl,
# data.npz, data.json and smollm2.gguf.part1. Options go to stitch_other_family.py (e.g. --expert-family gemma3_text).
# On a machine of your own, run stitch_other_family.py directly.
set -euo pipefail
STASH=/root/bts_families_stash
DATA=.carry/btx_smollm2
if [ "${1:-}" = stash ]; then
    mkdir -p "$STASH" && cp "$DATA/smollm2.gguf.part0" "$STASH/" && ls -la "$STASH"
    exit 0
fi
[ -f "$STASH/smollm2.gguf.part0" ] || { echo "no $STASH/smollm2.gguf.part0: run the stash call first (same warm machine)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cat "$STASH/smollm2.gguf.part0" "$DATA/smollm2.gguf.part1" > /root/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 examples/bts_families/stitch_other_family.py --data "$DATA" --gguf /root/SmolLM2-135M-Instruct.Q4_1.gguf \
    --workdir /root/bts_families_work --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/log.txt"
