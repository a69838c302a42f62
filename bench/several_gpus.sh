#!/usr/bin/env bash
# The Several issue's three runs on a lent nvidia-h200-x2 through the device tool (64 MiB a call), one call each,
# back to back while the machine is warm:
#   bash bench/several_gpus.sh bigger       carry .whl .carry/tokenizer .carry/btx_smollm2/smollm2.gguf.part0
#   bash bench/several_gpus.sh equivalence  carry .whl .carry/btx_smollm2/smollm2.gguf.part1 data.npz data.json
#   bash bench/several_gpus.sh scaling      carry .whl .carry/tokenizer
# `bigger` (or `stash` alone) stashes the first half of the SmolLM2 GGUF for `equivalence`
# (EQUIVALENCE_FLAGS="--tasks lora-dpo-traditional --only plain,zero3" re-runs one task); `scaling` ends with the bigger run's
# one-GPU attempt (it reuses the composed 13B checkpoint when the machine is the same). .whl holds, for Python 3.12:
# pydantic (+ pydantic_core, annotated_types, typing_inspection), datasets, dill, multiprocess, trl, peft, gguf, hjson
# and deepspeed built with DS_BUILD_OPS=0 (README of the device tool says how).
set -uo pipefail
MODE=${1:?bigger, equivalence, scaling or stash}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false
OUT=${OUT:-results}
mkdir -p "$OUT"
STASH=/root/btx_smollm2_stash
nvidia-smi -L
python3 -c 'import torch, transformers, accelerate, peft, trl; print("torch", torch.__version__, "transformers",
transformers.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__, "trl", trl.__version__)'
df -h /root | tail -1
case "$MODE" in
  stash)  # only the first GGUF half, for an `equivalence` call alone (carry .carry/btx_smollm2/smollm2.gguf.part0)
    mkdir -p "$STASH" && cp .carry/btx_smollm2/smollm2.gguf.part0 "$STASH/" && ls -la "$STASH"
    ;;
  bigger)
    mkdir -p "$STASH" && cp .carry/btx_smollm2/smollm2.gguf.part0 "$STASH/"
    python3 bench/several_bigger.py --workdir /root/bigger --out "$OUT" --tokenizer .carry/tokenizer \
        --phases prepare,train,reload 2>&1 | tee "$OUT/bigger-log.txt" | grep -v "it/s\]\|s/it\]"
    ;;
  equivalence)
    GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$STASH/smollm2.gguf.part0" ] || { echo "no $STASH/smollm2.gguf.part0: run 'bigger' first on this machine"; exit 2; }
    [ -f "$GGUF" ] || cat "$STASH/smollm2.gguf.part0" .carry/btx_smollm2/smollm2.gguf.part1 > "$GGUF"
    python3 bench/accelerate_runs.py --gguf "$GGUF" --data .carry/btx_smollm2 --workdir /root/accelerate_runs \
        --out "$OUT" ${EQUIVALENCE_FLAGS:-} 2>&1 | tee "$OUT/equivalence-log.txt" | grep -v "it/s\]\|s/it\]"
    ;;
  scaling)
    python3 bench/several_scaling.py --workdir /root/scaling --out "$OUT" --tokenizer .carry/tokenizer \
        ${SCALING_FLAGS:-} 2>&1 | tee "$OUT/scaling-log.txt" | grep -v "it/s\]\|s/it\]"
    rm -rf /root/scaling
    if [ -f /root/bigger/composed/config.json ]; then
      python3 bench/several_bigger.py --workdir /root/bigger --out "$OUT" --tokenizer .carry/tokenizer \
          --phases one-gpu 2>&1 | tee "$OUT/bigger-one-gpu-log.txt" | grep -v "it/s\]\|s/it\]"
    fi
    ;;
esac
