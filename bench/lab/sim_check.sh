#!/usr/bin/env bash
# The simulator against the live system (issue #6): SmolLM2 with one torch thread per worker (what
# scheduler/planner/profiles/smollm2-135m-cpu-1thread.json measured), bench's chatbot workload at
# three Poisson rates, then the same requests replayed through the simulator. Two setups, one
# after the other: colocated (one engine; the other core runs the HTTP front end and the load
# generator) and disaggregated 1P1D (a prefill and a decode worker, one core each, sharing with
# the front end, Ray and the load generator). Prefix caching is off: the warm-up replays every
# prompt, so each measured prompt would be cached, and the simulator (given lengths, not
# tokens) models no cache across requests.
#   bash bench/lab/sim_check.sh [MODES=colocated,disagg] [RATES=0.2,0.4,0.6] [NUM_PROMPTS=32]
set -euo pipefail
modes=${1:-colocated,disagg}; rates=${2:-0.2,0.4,0.6}; n=${3:-32}
cd "$(dirname "$0")/../.."
bin=.venv/bin
tokenizer=()
[ -d ../peer/smollm2 ] && tokenizer=(--tokenizer ../peer/smollm2)  # exact prompt lengths when at hand
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null || true' EXIT
for mode in ${modes//,/ }; do
  case $mode in
    colocated) serve=(--mode colocated); sim=(--colocated 1) ;;
    disagg) serve=(--mode disagg --prefill-workers 1 --decode-workers 1); sim=(--prefill-workers 1 --decode-workers 1) ;;
    *) echo "unknown mode $mode (colocated or disagg)" >&2; exit 2 ;;
  esac
  $bin/pdserve serve "${serve[@]}" --num-threads 1 --port 8061 --no-enable-prefix-caching --log-level warning & pid=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:8061/health >/dev/null && break; sleep 1; done
  $bin/pdserve bench --target "$mode=http://127.0.0.1:8061" --dataset chatbot --output-len 64 \
    --num-prompts "$n" --warmup "$n" --sweep-rates "$rates" "${tokenizer[@]}" --goodput ttft:2000 tpot:200 \
    --result-json "docs/results/sim-check-live-$mode.json"
  kill -INT $pid; wait $pid || true; pid=
  $bin/python -m bench.lab.sim_check --live "docs/results/sim-check-live-$mode.json" \
    --profile smollm2-135m-cpu-1thread "${sim[@]}" --goodput ttft:2000 tpot:200 --out "docs/results/sim-check-$mode.json"
done
