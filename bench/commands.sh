#!/usr/bin/env bash
# The user commands on FLUX.1-dev's real size (flux-dev-random) on one H100/H200: time and peak memory per stage.
# Writes $OUT/commands.json as it goes and prints a table last. BUDGET_S (default 270) bounds the sections started;
# SECTIONS picks some of gen8k,gen,synth,distill,eval,offload,fits (default all, in that order).
# The device image has torch but not diffusers/transformers: `bash bench/fetch_wheels.sh` here first, then run
# this there with `.whl` carried (the device tool: carry [".whl"]); the wheels go into /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -u
export OUT="${OUT:-$PWD/out/commands}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
BUDGET_S="${BUDGET_S:-270}"
# hard stop 45 s past the budget (a started section may overrun it); figures so far are in $OUT/commands.json
timeout -k 10 "$((BUDGET_S + 45))" python3 bench/commands.py --out "$OUT" --budget-s "$BUDGET_S" "$@"
rc=$?
[ -f "$OUT/commands.json" ] && echo "figures: $OUT/commands.json"
exit $rc
