#!/usr/bin/env bash
# Routing policies on a workload whose prompts shift from short to long halfway (issue #6):
# pdserve 1P2D on SmolLM2 (CPU, one torch thread per worker) under jsq, conditional, mixed, and
# jsq with the role controller; the same requests, Poisson arrivals at RATE, each server alone
# on the box (started, benched, stopped in turn: four 1P2D clusters at once would share 2 cores).
# Results: bench/results/policy-<name>.json; the README's table puts them side by side.
#   bash bench/policy_compare.sh [RATE=0.5] [NUM_PROMPTS=40] [WHICH="jsq conditional mixed controller"]
set -euo pipefail
rate=${1:-0.5}; n=${2:-40}; which=${3:-jsq conditional mixed controller}
cd "$(dirname "$0")/.."
bin=.venv/bin
slo=(--slo-ttft-ms 2000 --slo-tpot-ms 200)
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; sleep 3; }
for name in $which; do
  case $name in
    jsq) extra=(--policy jsq) ;;
    conditional) extra=(--policy conditional --local-prefill-tokens 256 --prefill-full-tokens 1024) ;;
    mixed) extra=(--policy mixed --prefill-full-tokens 1024) ;;
    controller) extra=(--policy jsq --role-controller --controller-window-s 10) ;;
    *) echo "unknown policy $name" >&2; exit 2 ;;
  esac
  $bin/pdserve serve --mode disagg --prefill-workers 1 --decode-workers 2 --num-threads 1 --port 8051 \
    --log-level warning "${slo[@]}" "${extra[@]}" & pid=$!
  wait_up 8051
  $bin/pdserve bench --target "$name=http://127.0.0.1:8051" --dataset shift --input-len 400 --output-len 32 \
    --range-ratio 0.5 --num-prompts "$n" --request-rate "$rate" --warmup 4 --goodput ttft:2000 tpot:200 \
    --result-json "bench/results/policy-$name.json" || true
  curl -s http://127.0.0.1:8051/metrics | grep -E "^pdserve_(controller|local_prefills|worker_lent|worker_up)" || true
  stop $pid
done
