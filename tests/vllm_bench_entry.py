"""`vllm bench serve` as its CLI runs it, from the installed vLLM (the `vllm` command needs
package metadata the CPU wheel names differently), several runs in one process (vLLM imports
once): `python vllm_bench_entry.py ARGS... [:: ARGS...]` prints each run's result as a line of
RESULT and its JSON, and waits for a line on stdin before each run."""

import json
import sys

RESULT = "RESULT "

if __name__ == "__main__":
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    argv, runs = sys.argv[1:], [[]]
    for arg in argv:
        runs.append([]) if arg == "::" else runs[-1].append(arg)
    for args in runs:
        sys.stdin.readline()
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        result = main(parser.parse_args(args))
        print(RESULT + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}), flush=True)
