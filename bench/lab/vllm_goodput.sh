#!/usr/bin/env bash
# Goodput on the chatbot workload, SmolLM2 on CPU, vLLM's engine both sides: pdserve 1P1D over vLLM
# workers (a worker per core) against vLLM's own colocated server on the same two cores
# (VLLM_CPU_OMP_THREADS_BIND=0-1); bf16, block size 32, eager for both. Both servers stay up (each
# idles at a few percent of a core) and the load tester interleaves their phases at each rate.
#   bash bench/lab/vllm_goodput.sh PEER_DIR [RATES=2,4,6,8,10] [NUM_PROMPTS=64]
# Results: docs/results/chatbot-vllm-engine.json and plots in docs/results/chatbot-vllm-engine/
set -euo pipefail
peer=${1:?usage: vllm_goodput.sh PEER_DIR [RATES] [NUM_PROMPTS]}; rates=${2:-2,4,6,8,10}; n=${3:-64}
cd "$(dirname "$0")/../.."
bin=.venv/bin
wait_up() { for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
$bin/pdserve serve --mode disagg --model "$peer/smollm2" --served-model-name smollm2 --engine vllm --dtype bfloat16 \
  --max-model-len 2048 --block-size 32 --vllm-engine-args '{"enforce_eager": true}' --port 8051 --log-level warning &
pd=$!
VLLM_CPU_OMP_THREADS_BIND=0-1 TMPDIR=$(mktemp -d) bash bench/lab/peers/vllm-serve.sh "$peer" colocated 8021 & vl=$!
trap 'kill $pd $vl 2>/dev/null; wait' EXIT
wait_up 8051 && wait_up 8021
$bin/pdserve bench --target pdserve-vllm-1p1d=http://127.0.0.1:8051 --target vllm-colocated=http://127.0.0.1:8021 \
  --dataset chatbot --output-len 64 --num-prompts "$n" --warmup "$n" --sweep-rates "$rates" \
  --tokenizer "$peer/smollm2" --goodput ttft:2000 tpot:200 \
  --result-json docs/results/chatbot-vllm-engine.json --plot-dir docs/results/chatbot-vllm-engine
