"""`vllm bench serve` as its CLI runs it, from the installed vLLM (the `vllm` command needs
package metadata the CPU wheel names differently): `python vllm_bench_entry.py ARGS...`
prints the result's JSON on its last line."""

import json
import sys

if __name__ == "__main__":
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = main(parser.parse_args(sys.argv[1:]))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
