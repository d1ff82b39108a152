#!/usr/bin/env bash
# Low-load comparison for issue #4: pdserve 1P1D, pdserve colocated and vLLM 1P1D (NixlConnector),
# SmolLM2 on CPU, one request at a time, the same chatbot requests for each. Servers run one at a
# time: vLLM's 1P1D pair busy-polls both cores, and every server here gets the whole box to itself.
#   bash bench/disagg_lowload.sh [PEER_DIR=/work/peer] [NUM_PROMPTS=16]
# Results: bench/results/lowload-{pdserve-1p1d,pdserve-colocated,vllm-1p1d}.json
set -euo pipefail
peer=${1:-/work/peer}; n=${2:-16}
cd "$(dirname "$0")/.."
bin=.venv/bin
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
run() {  # NAME PORT: bench the server listening on PORT
  $bin/pdserve bench --target "$1=http://127.0.0.1:$2" --dataset chatbot --output-len 64 --num-prompts "$n" \
    --warmup "$n" --max-concurrency 1 --tokenizer "$peer/smollm2" --goodput ttft:2000 tpot:200 \
    --result-json "bench/results/lowload-$1.json"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; sleep 3; }

# pdserve 1P1D: a prefill and a decode worker actor, one core (thread) each
$bin/pdserve serve --mode disagg --port 8041 --log-level warning & pid=$!
wait_up 8041 && run pdserve-1p1d 8041; stop $pid
# pdserve colocated: compute on one core, as in the goodput comparison
$bin/pdserve serve --mode colocated --num-threads 1 --port 8011 --log-level warning & pid=$!
wait_up 8011 && run pdserve-colocated 8011; stop $pid
# vLLM 1P1D: prefill on core 0, decode on core 1, NixlConnector, a proxy in front
TMPDIR=$(mktemp -d) bash ../shared/peers/vllm-serve.sh "$peer" 1p1d 8031 & pid=$!
wait_up 8031 && run vllm-1p1d 8031; stop $pid
