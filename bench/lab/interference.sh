#!/usr/bin/env bash
# Issue #7: a long prompt arriving while 16 requests decode, under whole, chunked and layered
# prefill, and semi-PD. Four SmolLM2 servers (three colocated, one per schedule, and one semi-PD
# whose prefill stream prefills whole prompts on its own core; up at once, measured one after
# the other by bench's side-by-side mode), the trace from `python -m bench.lab.interference trace`,
# then the decoders' largest inter-token gap per target.
#   bash bench/lab/interference.sh [LONG_TOKENS=2048] [TOKEN_BUDGET=512]
set -euo pipefail
long=${1:-2048}; budget=${2:-512}
cd "$(dirname "$0")/../.."
bin=.venv/bin
tokenizer=()
[ -d ../peer/smollm2 ] && tokenizer=(--tokenizer ../peer/smollm2)
out=docs/results
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
port=8071
targets=()
for target in whole chunked layered semi-pd; do
  mode=colocated; schedule=$target
  [ "$target" = semi-pd ] && mode=semi-pd && schedule=whole
  $bin/pdserve serve --mode $mode --port $port --prefill-schedule $schedule --token-budget "$budget" \
    --max-num-batched-tokens 2048 --no-enable-prefix-caching --log-level warning & pids+=($!)
  targets+=(--target "$target=http://127.0.0.1:$port")
  port=$((port + 1))
done
for p in 8071 8072 8073 8074; do
  for _ in $(seq 300); do curl -sf http://127.0.0.1:$p/health >/dev/null && break; sleep 1; done
done
$bin/python -m bench.lab.interference trace --out "$out/interference-trace.jsonl" --long-tokens "$long" "${tokenizer[@]}"
$bin/pdserve bench "${targets[@]}" --dataset file "$out/interference-trace.jsonl" --request-rate inf \
  "${tokenizer[@]}" --result-json "$out/interference-live.json"
$bin/python -m bench.lab.interference report "$out/interference-live.json" --json "$out/interference.json"
