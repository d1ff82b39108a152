"""What constrained decoding costs the requests beside it: decode step time of a batch of free
(unconstrained) requests alone, and with as many JSON-schema-constrained requests in the same
batch, against a batch of twice as many free requests (the same batch size, no grammar).
Offline engine on the default model, greedy, EOS ignored.
  python -m bench.lab.structured_overhead [--batch 8] [--tokens 48] [--repeats 3]"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                                           "score": {"type": "integer"}}, "required": ["name", "tags", "score"]}


def _decode_step_s(engine, prompts: list[list[int]], params: list) -> float:
    """Mean seconds per decode step once every request has its first token."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    steps, started = 0, None
    while engine.has_unfinished():
        outs = engine.step()
        if started is None and outs and all(r.num_output_tokens for rs in engine.requests.values() for r in rs):
            started = time.perf_counter()
        elif started is not None:
            steps += 1
    return (time.perf_counter() - started) / max(1, steps)


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
    results = {}
    for name, params in cases.items():
        best = min(_decode_step_s(engine, prompts[:len(params)], params) for _ in range(args.repeats))
        results[name] = round(best * 1000, 2)
    results["grammar cost per step (ms)"] = round(results["free x B + constrained x B"] - results["free x 2B"], 2)
    print(json.dumps({"batch": args.batch, "decode_step_ms": results}, indent=1))


if __name__ == "__main__":
    main()
