#!/usr/bin/env bash
# The Speed issue's GPU call through the device tool: carry .whl (pydantic and its three dependencies, for Python 3.12)
# and, for a before/after table, .baseline (another version's `moekit` package, e.g.
# `git archive <commit> moekit | tar -x -C .baseline`). Runs the CUDA kernel tests and the bf16 smoke test before
# any timing, then bench/end_to_end.py (SHAPES, default the issue's) for this checkout and the baseline, then the
# whole-model profile. Everything lands in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
SHAPES=${SHAPES:-issue}
nvidia-smi -L
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_expert_backends.py 2>&1 | tail -3
python3 bench/gpu_smoke.py || exit 1
if [ -d .baseline/moekit ] && [ -z "${SKIP_BASELINE:-}" ]; then
  python3 bench/end_to_end.py --shapes $SHAPES --package-root .baseline --json "$OUT/e2e-baseline.json" ${E2E_FLAGS:-}
fi
python3 bench/end_to_end.py --shapes $SHAPES --json "$OUT/e2e.json" ${E2E_FLAGS:-}
[ -n "${SKIP_PROFILE:-}" ] || python3 bench/profile_model.py > "$OUT/profile.txt" 2>&1
