#!/usr/bin/env bash
# Low-load comparison for issue #4: pdserve 1P1D, pdserve colocated and vLLM 1P1D (NixlConnector),
# SmolLM2 on CPU, one request at a time, the same chatbot requests for each. Servers run one at a
# time: vLLM's 1P1D pair busy-polls both cores, and every server here gets the whole box to itself.
#   bash bench/lab/disagg_lowload.sh [PEER_DIR] [NUM_PROMPTS=16] [WHICH="pdserve-1p1d pdserve-colocated vllm-1p1d"]
# Results: docs/results/lowload-{pdserve-1p1d,pdserve-colocated,vllm-1p1d}.json
set -euo pipefail
peer=${1:?usage: disagg_lowload.sh PEER_DIR [NUM_PROMPTS] [WHICH]}; n=${2:-16}; which=${3:-pdserve-1p1d pdserve-colocated vllm-1p1d}
cd "$(dirname "$0")/../.."
bin=.venv/bin
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
run() {  # NAME PORT: bench the server listening on PORT
  $bin/pdserve bench --target "$1=http://127.0.0.1:$2" --dataset chatbot --output-len 64 --num-prompts "$n" \
    --warmup "$n" --max-concurrency 1 --tokenizer "$peer/smollm2" --goodput ttft:2000 tpot:200 \
    --result-json "docs/results/lowload-$1.json"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; sleep 3; }

for target in $which; do
  case $target in
    # a prefill and a decode worker actor, one core (torch thread) each
    pdserve-1p1d) $bin/pdserve serve --mode disagg --port 8041 --log-level warning & pid=$!; port=8041 ;;
    # compute on one core, as in the goodput comparison
    pdserve-colocated) $bin/pdserve serve --mode colocated --num-threads 1 --port 8011 --log-level warning & pid=$!; port=8011 ;;
    # prefill on core 0, decode on core 1, NixlConnector, a proxy in front
    vllm-1p1d) TMPDIR=$(mktemp -d) bash bench/lab/peers/vllm-serve.sh "$peer" 1p1d 8031 & pid=$!; port=8031 ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  wait_up $port && run "$target" $port; stop $pid
done
