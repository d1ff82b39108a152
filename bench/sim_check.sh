#!/usr/bin/env bash
# The simulator against the live system (issue #6): pdserve colocated on SmolLM2 with one torch
# thread (what scheduler/planner/profiles/smollm2-135m-cpu-1thread.json measured; the other core
# runs the HTTP front end and the load generator, as in the README's goodput runs), bench's chatbot
# workload at three Poisson rates, then the same requests replayed through the simulator. Prefix
# caching is off: the warm-up replays every prompt, so each measured prompt would be cached,
# and the simulator (given lengths, not tokens) models no cache across requests.
#   bash bench/sim_check.sh [RATES=0.2,0.4,0.6] [NUM_PROMPTS=32]
set -euo pipefail
rates=${1:-0.2,0.4,0.6}; n=${2:-32}
cd "$(dirname "$0")/.."
bin=.venv/bin
tokenizer=()
[ -d ../peer/smollm2 ] && tokenizer=(--tokenizer ../peer/smollm2)  # exact prompt lengths when at hand
$bin/pdserve serve --num-threads 1 --port 8061 --no-enable-prefix-caching --log-level warning & pid=$!
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8061/health >/dev/null && break; sleep 1; done
$bin/pdserve bench --target pdserve=http://127.0.0.1:8061 --dataset chatbot --output-len 64 \
  --num-prompts "$n" --warmup "$n" --sweep-rates "$rates" "${tokenizer[@]}" --goodput ttft:2000 tpot:200 \
  --result-json bench/results/sim-check-live.json
$bin/python -m bench.sim_check --live bench/results/sim-check-live.json --profile smollm2-135m-cpu-1thread \
  --colocated 1 --goodput ttft:2000 tpot:200 --out bench/results/sim-check.json
