#!/usr/bin/env bash
# Low load over vLLM's engine, SmolLM2 on CPU, one request at a time, the same chatbot requests for
# each server, each alone on the box: pdserve 1P1D over vLLM workers (--engine vllm), vLLM's own
# 1P1D (NixlConnector), vLLM colocated, and pdserve 1P1D with its own engine. Every vLLM runs bf16,
# block size 32, eager, on SmolLM2 converted to an HF folder (the peer set-up's). After the run, the
# idle CPU of every process of the server (10 s, no request).
#   bash bench/lab/vllm_lowload.sh PEER_DIR [NUM_PROMPTS=16] [WHICH]
# Results: docs/results/lowload-<target>.json and docs/results/idle-<target>.json
set -euo pipefail
peer=${1:?usage: vllm_lowload.sh PEER_DIR [NUM_PROMPTS] [WHICH]}; n=${2:-16}
which=${3:-pdserve-vllm-1p1d vllm-1p1d vllm-colocated pdserve-1p1d}
cd "$(dirname "$0")/../.."
bin=.venv/bin
model=(--model "$peer/smollm2" --served-model-name smollm2)
vllm=(--engine vllm --dtype bfloat16 --max-model-len 2048 --block-size 32 --vllm-engine-args '{"enforce_eager": true}')
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
run() {  # NAME PORT PID: bench the server listening on PORT, then its idle CPU
  $bin/pdserve bench --target "$1=http://127.0.0.1:$2" --dataset chatbot --output-len 64 --num-prompts "$n" \
    --warmup "$n" --max-concurrency 1 --tokenizer "$peer/smollm2" --goodput ttft:2000 tpot:200 \
    --result-json "docs/results/lowload-$1.json"
  sleep 5  # the last request's tail (vLLM's NIXL notifications) is over
  $bin/python -m bench.lab.idle_cpu "$3" --window-s 10 --result-json "docs/results/idle-$1.json"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; sleep 3; }

for target in $which; do
  case $target in
    # a prefill and a decode vLLM worker, one core each (OpenMP bound to it)
    pdserve-vllm-1p1d) $bin/pdserve serve --mode disagg "${model[@]}" "${vllm[@]}" --port 8051 --log-level warning & pid=$!; port=8051 ;;
    # prefill on core 0, decode on core 1, NixlConnector, a proxy in front
    vllm-1p1d) TMPDIR=$(mktemp -d) bash bench/lab/peers/vllm-serve.sh "$peer" 1p1d 8031 & pid=$!; port=8031 ;;
    vllm-colocated) VLLM_CPU_OMP_THREADS_BIND=0-1 TMPDIR=$(mktemp -d) bash bench/lab/peers/vllm-serve.sh "$peer" colocated 8021 & pid=$!; port=8021 ;;
    # pdserve's own engine (fp32, its CPU default), a worker per core
    pdserve-1p1d) $bin/pdserve serve --mode disagg --port 8041 --log-level warning & pid=$!; port=8041 ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  wait_up $port && run "$target" $port $pid; stop $pid
done
