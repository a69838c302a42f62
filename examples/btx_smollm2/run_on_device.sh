#!/usr/bin/env bash
# The SmolLM2 study on a lent GPU through the device tool, which carries at most 64 MiB per call: SmolLM2's GGUF
# (94 MB) travels in two halves (`prepare.py --split-model`) and a large data set in parts (`prepare.py --split-data`),
# over several calls to the same warm machine. Every call first stashes what it carries under .carry/ into
# /root/stash (so later calls need not carry it again) and reassembles the GGUF and data.npz once all parts are there.
#   bash examples/btx_smollm2/run_on_device.sh stash                  # carry some parts, run nothing
#   DATA=study WORKDIR=/root/study/e1M bash examples/btx_smollm2/run_on_device.sh run [pipeline.py options]
#   bash examples/btx_smollm2/run_on_device.sh assemble               # only stash and reassemble (other scripts)
# LEDGER=file seeds an empty WORKDIR's ledger.json (models it lists are not trained again under --reuse: a budget
# begun in an earlier session, e.g. LEDGER=docs/results/study/e5M/ledger.json ... run --stage baselines --reuse).
# DATA names the folder under .carry/ (default btx_smollm2, which also holds the GGUF halves); the wheels in .whl
# (pydantic, gguf and their dependencies) are installed once per machine. On a machine of your own, run pipeline.py.
set -euo pipefail
STASH=/root/stash
DATA=${DATA:-btx_smollm2}
GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$STASH"
[ -d .carry ] && cp -r .carry/. "$STASH/"
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    touch /tmp/site/.installed
fi
if [ ! -f "$GGUF" ] && [ -f "$STASH/btx_smollm2/smollm2.gguf.part0" ] && [ -f "$STASH/btx_smollm2/smollm2.gguf.part1" ]; then
    cat "$STASH/btx_smollm2/smollm2.gguf.part0" "$STASH/btx_smollm2/smollm2.gguf.part1" > "$GGUF"
fi
if [ ! -f "$STASH/$DATA/data.npz" ] && ls "$STASH/$DATA"/data.npz.part* > /dev/null 2>&1; then
    parts=$(ls "$STASH/$DATA"/data.npz.part* | sort -V)
    if [ -f "$STASH/$DATA/data.json" ] && python3 - "$STASH/$DATA" $parts <<'EOF'
import json, os, sys
folder, parts = sys.argv[1], sys.argv[2:]
expected = json.load(open(os.path.join(folder, "data.json"))).get("npz_parts")
sys.exit(0 if expected is None or len(parts) == expected else 1)
EOF
    then cat $parts > "$STASH/$DATA/data.npz"; fi
fi
ls -la "$STASH" "$STASH/$DATA" 2>/dev/null || true
case "${1:-}" in
    stash|assemble) exit 0 ;;
    run) ;;
    *) echo "usage: run_on_device.sh stash|assemble|run [pipeline.py options]"; exit 2 ;;
esac
[ -f "$GGUF" ] || { echo "no $GGUF: carry both halves of the GGUF (stash calls on the same warm machine)"; exit 2; }
[ -f "$STASH/$DATA/data.npz" ] || { echo "no $STASH/$DATA/data.npz: carry its parts first"; exit 2; }
WORKDIR=${WORKDIR:-/root/btx_work}
if [ -n "${LEDGER:-}" ] && [ ! -f "$WORKDIR/ledger.json" ]; then  # resume a budget begun in an earlier session
    mkdir -p "$WORKDIR" && cp "$LEDGER" "$WORKDIR/ledger.json"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 examples/btx_smollm2/pipeline.py --data "$STASH/$DATA" --gguf "$GGUF" --workdir "$WORKDIR" \
    --out "$OUT" "${@:2}" 2>&1 | tee -a "$OUT/log.txt"
