#!/usr/bin/env bash
# The SmolLM2 reproduction on a lent GPU through the device tool, which carries at most 64 MiB per call: the GGUF
# (94 MB) travels in two halves made by `prepare.py --split-model`. Call 1: `bash run_on_device.sh stash` carrying
# .carry/btx_smollm2/smollm2.gguf.part0; call 2, while the machine is still warm: `bash run_on_device.sh run`
# carrying .whl, data.npz, data.json and smollm2.gguf.part1. On a machine of your own, run pipeline.py directly.
set -euo pipefail
STASH=/root/btx_smollm2_stash
DATA=.carry/btx_smollm2
if [ "${1:-}" = stash ]; then
    mkdir -p "$STASH" && cp "$DATA/smollm2.gguf.part0" "$STASH/" && ls -la "$STASH"
    python3 -c "import pandas, matplotlib" 2>&1 || true
    exit 0
fi
[ -f "$STASH/smollm2.gguf.part0" ] || { echo "no $STASH/smollm2.gguf.part0: run the stash call first (same warm machine)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cat "$STASH/smollm2.gguf.part0" "$DATA/smollm2.gguf.part1" > /root/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-results}
python3 examples/btx_smollm2/pipeline.py --data "$DATA" --gguf /root/SmolLM2-135M-Instruct.Q4_1.gguf \
    --workdir /root/btx_work --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/log.txt"
