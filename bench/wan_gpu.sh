#!/usr/bin/env bash
# 3-D CLEAR at Wan 2.1 sizes on one H100/H200 in one call of at most ~8 minutes (bench/wan_gpu.py says what, in
# order). As bench/gpu.sh: run `bash bench/fetch_wheels.sh` here first, then this there with `.whl` carried.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "warning: installing the carried wheels failed" >&2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
set -u
export OUT="${OUT:-$PWD/out/wan_gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
BUDGET_S="${BUDGET_S:-420}"
timeout -k 10 "$((BUDGET_S + 60))" python3 bench/wan_gpu.py --out "$OUT" --budget-s "$BUDGET_S" "$@"
rc=$?
[ -f "$OUT/wan_gpu.json" ] && echo "figures: $OUT/wan_gpu.json"
exit $rc
