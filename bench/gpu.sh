#!/usr/bin/env bash
# CLEAR on one H100/H200 in one call of at most 8 minutes (bench/gpu_bench.py says what it measures, in order):
# attention 8K first, then whole FLUX-size steps at 8K / 4K / 1K (CLEAR and stock, eager and compiled), then the
# rest as time allows. $OUT/gpu_bench.json is rewritten after every measurement; a table is printed last.
# The device image has torch but not diffusers: run `bash bench/fetch_wheels.sh` here first, then this there with
# `.whl` carried (device tool: command "bash bench/gpu.sh", carry [".whl"], timeout_s 540).
# BUDGET_S (default 420): start no measurement expected to end later; the hard stop is 40 s after it.
# Extra arguments go to gpu_bench.py (e.g. --only "step 8k" or --skip fwdbwd).
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "warning: installing the carried wheels failed" >&2
    export PYTHONPATH=/tmp/site:$PWD
else   # here (--smoke on the CPU): the checkout's own packages
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
set -u
export OUT="${OUT:-$PWD/out/gpu_bench}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
BUDGET_S="${BUDGET_S:-420}"
timeout -k 10 "$((BUDGET_S + 40))" python3 bench/gpu_bench.py --out "$OUT" --budget-s "$BUDGET_S" "$@"
rc=$?
[ -f "$OUT/gpu_bench.json" ] && echo "figures: $OUT/gpu_bench.json"
exit $rc
