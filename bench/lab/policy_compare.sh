#!/usr/bin/env bash
# Routing policies on a workload whose prompts shift from short to long halfway (issue #6):
# pdserve 1P2D on SmolLM2 (CPU, one torch thread per worker) under jsq, conditional, mixed, and
# jsq with the role controller, compared in bench's side-by-side mode: the four servers are up
# at once and one `pdserve bench` sends each the same requests (Poisson arrivals at RATE), one
# target at a time (the idle ones only poll their workers), so machine noise falls on all alike.
# Twelve workers fit this box's 23 GiB only slimmed: no MKL-packed weight copies, 384 MiB of KV
# each (8.7k tokens; prompts here stay under 1k) and a 2k context.
# Results: docs/results/policy-compare.json, and each server's routing/controller metrics.
#   bash bench/lab/policy_compare.sh [RATE=0.5] [NUM_PROMPTS=40] [WHICH="jsq conditional mixed controller"]
set -euo pipefail
rate=${1:-0.5}; n=${2:-40}; which=${3:-jsq conditional mixed controller}
cd "$(dirname "$0")/../.."
bin=.venv/bin
slo=(--slo-ttft-ms 2000 --slo-tpot-ms 200)
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
pids=(); targets=(); port=8051
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for name in $which; do
  case $name in
    jsq) extra=(--policy jsq) ;;
    conditional) extra=(--policy conditional --local-prefill-tokens 256 --prefill-full-tokens 1024) ;;
    mixed) extra=(--policy mixed --prefill-full-tokens 1024) ;;
    controller) extra=(--policy jsq --role-controller --controller-window-s 10) ;;
    *) echo "unknown policy $name" >&2; exit 2 ;;
  esac
  $bin/pdserve serve --mode disagg --prefill-workers 1 --decode-workers 2 --num-threads 1 --port $port \
    --cpu-weight-packing off --kv-cache-memory 384MiB --max-model-len 2048 --log-level warning "${slo[@]}" "${extra[@]}" & pids+=($!)
  wait_up $port  # one at a time: four clusters starting at once would time each other out
  targets+=(--target "$name=http://127.0.0.1:$port"); port=$((port + 1))
done
$bin/pdserve bench "${targets[@]}" --dataset shift --input-len 400 --output-len 32 --range-ratio 0.5 \
  --num-prompts "$n" --request-rate "$rate" --warmup 4 --goodput ttft:2000 tpot:200 \
  --result-json docs/results/policy-compare.json
port=8051
for name in $which; do
  echo "== $name"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^pdserve_(controller|local_prefills|worker_lent)" || true
  port=$((port + 1))
done
