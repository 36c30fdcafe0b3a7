#!/usr/bin/env bash
# CLEAR on one H100/H200: FLUX-size attention kernel, blocks and (time allowing) a whole 4K step, full vs CLEAR.
# Writes $OUT/gpu_bench.json as it goes and prints a table last; finishes in about 4 minutes.
# The device image has torch but not diffusers: `bash bench/fetch_wheels.sh` here first, then run this there
# with `.whl` carried (the device tool: carry [".whl"]); the wheels go into /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -u
export OUT="${OUT:-$PWD/out/gpu_bench}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# hard stop well inside the caller's limit; partial figures are already in $OUT/gpu_bench.json
timeout -k 10 300 python3 bench/gpu_bench.py --out "$OUT" --budget-s "${BUDGET_S:-220}" "$@"
rc=$?
[ -f "$OUT/gpu_bench.json" ] && echo "figures: $OUT/gpu_bench.json"
exit $rc
