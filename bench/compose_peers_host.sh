#!/usr/bin/env bash
# bench/compose_peers.py on the GPU host (16 cores) through the device tool: the Speed issue's second compose setting,
# eight experts of 1.19 GB. The image has torch and transformers but none of the peers: carry .whl (pydantic,
# datasets and their dependencies, for Python 3.12) and .peers/host (the peers' wheels from the package index:
# mergekit-0.1.5, mixturekit-1.1.1 (the original), immutables-0.21 for cp312), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       mergekit==0.1.5 mixturekit==1.1.1 immutables==0.21 -d .peers/host
# Each tool gets its own site folder on top of the image's packages; ours runs from this checkout.
set -euo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
install() { python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$@"; }
install /tmp/peer-ours .whl/*.whl
install /tmp/peer-mergekit .peers/host/mergekit-*.whl .peers/host/immutables-*.whl .whl/pydantic*.whl \
    .whl/annotated_types-*.whl .whl/typing_inspection-*.whl .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl
install /tmp/peer-original .peers/host/mixturekit-*.whl
for tool in ours mergekit original; do  # a Python per tool: the image's, with the tool's folder on its path
    printf '#!/bin/sh\nPYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/peer-%s" exec python3 "$@"\n' "$tool" > "/tmp/python-$tool"
    chmod +x "/tmp/python-$tool"
done
nproc; free -g | head -2; df -h /tmp | tail -1
python3 bench/compose_peers.py --host --experts "${EXPERTS:-8}" --repeats "${REPEATS:-3}" --workdir /tmp/compose-peers \
    --ours-python /tmp/python-ours --mergekit-python /tmp/python-mergekit --original-python /tmp/python-original \
    --json "$OUT/compose-peers-host.json" ${PEERS_FLAGS:-} 2>&1 | tee "$OUT/compose-peers-host.txt"
