"""What constrained decoding costs the requests beside it: decode step time of a batch of free
(unconstrained) requests alone, and with as many JSON-schema-constrained requests in the same
batch, against a batch of twice as many free requests (the same batch size, no grammar).
Offline engine on the default model, greedy, EOS ignored; each case timed over the same decode
steps (the constrained requests stop when their JSON closes), best of --repeats.
  python -m bench.lab.structured_overhead [--batch 8] [--tokens 48] [--repeats 3]"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                                           "score": {"type": "integer"}}, "required": ["name", "tags", "score"]}


def _decode_steps_s(engine, prompts: list[list[int]], params: list) -> list[float]:
    """Seconds of each decode step while every request runs (each has its first token and
    none has finished: a constrained request stops when its JSON closes)."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    times = []
    while engine.has_unfinished():
        full = len(engine.requests) == len(params) and all(r.num_output_tokens for rs in engine.requests.values()
                                                            for r in rs)
        started = time.perf_counter()
        engine.step()
        if full and len(engine.requests) == len(params):
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    from engine.structured_output import StructuredOutput
    engine = Engine(EngineConfig(max_model_len=512, num_kv_blocks=512))
    prompts = [[1, 2245, 314, 253, 3365, 28, 10, 20 + i] for i in range(2 * args.batch)]
    free = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                 structured=StructuredOutput.json_schema(SCHEMA))
    engine.validate(prompts[0], constrained)  # compiled once, outside the timings
    cases = {"free x B": [free] * args.batch, "free x 2B": [free] * (2 * args.batch),
             "free x B + constrained x B": [free] * args.batch + [constrained] * args.batch}
    runs = {name: [_decode_steps_s(engine, prompts[:len(params)], params) for _ in range(args.repeats)]
            for name, params in cases.items()}
    steps = max(1, min(len(t) for repeats in runs.values() for t in repeats))  # the same steps (context lengths) in each
    results = {name: round(min(sum(t[:steps]) / steps for t in repeats) * 1000, 2) for name, repeats in runs.items()}
    results["grammar cost per step (ms)"] = round(results["free x B + constrained x B"] - results["free x 2B"], 2)
    print(json.dumps({"batch": args.batch, "decode_steps_timed": steps, "decode_step_ms": results}, indent=1))


if __name__ == "__main__":
    main()
