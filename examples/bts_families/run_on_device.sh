#!/usr/bin/env bash
# The cross-family BTS demonstration on a lent GPU through the device tool. SmolLM2's GGUF and the data travel as
# for the SmolLM2 study (examples/btx_smollm2/run_on_device.sh: parts carried under .carry/ over calls to the same
# warm machine, stashed and reassembled there):
#   DATA=study bash examples/bts_families/run_on_device.sh [stitch_other_family.py options, e.g. --expert-domain c]
# On a machine of your own, run stitch_other_family.py directly.
set -euo pipefail
DATA=${DATA:-btx_smollm2}
DATA=$DATA bash examples/btx_smollm2/run_on_device.sh assemble > /dev/null
GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || { echo "no $GGUF: carry both halves of the GGUF first"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 examples/bts_families/stitch_other_family.py --data "/root/stash/$DATA" --gguf "$GGUF" \
    --workdir /root/bts_families_work --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
