"""Decode and prefill throughput of pdserve's engine against HF transformers and vLLM, in one run.

    python -m bench.lab.engine_throughput [--threads N] [--vllm-dir /path/from/vllm-setup.sh] [--quick]

Each system runs in its own subprocess (vLLM from this environment, or from the virtualenv
bench/lab/peers/vllm-setup.sh makes) on the same SmolLM2-135M-Instruct weights, with the same
token-id prompts and the same timing method (bench/lab/throughput_worker.py). Compute is given
the same number of cores: torch threads for pdserve and HF, VLLM_CPU_OMP_THREADS_BIND for
vLLM. Prints a table with pdserve's ratio to each peer and writes --result-json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("throughput_worker.py")


def run_system(python: str, system: str, model: str, dtype: str, threads: int, extra: list[str],
               env: dict | None = None) -> dict | None:
    cmd = [python, str(WORKER), "--system", system, "--model", model, "--dtype", dtype,
           "--threads", str(threads), *extra]
    print(f"running {system} ({dtype}, {threads} thread(s)) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"{system} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def hf_folder(vllm_dir: Path | None, given: Path | None = None) -> str:
    """The SmolLM2 GGUF as an HF folder: given, or what vllm-setup.sh made, or converted here."""
    if given:
        return str(given)
    if vllm_dir and (vllm_dir / "smollm2" / "config.json").exists():
        return str(vllm_dir / "smollm2")
    out = Path(tempfile.gettempdir()) / "pdserve-smollm2-hf"
    if not (out / "config.json").exists():
        write_hf_folder(out)
    return str(out)


def write_hf_folder(out: Path) -> Path:
    """The default model as transformers reads its GGUF file (fp32), written to out as an HF
    folder with pdserve's tokenizer of the same file. transformers' own save_pretrained
    refuses a model read from GGUF, so its tensors are written as they are."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from engine.models.registry import default_model_path, derived_dir
    from scheduler.tokenizer import Tokenizer
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    del hf.config.quantization_config  # the tensors are plain fp32 now (vLLM would read this as GGUF)
    hf.config.save_pretrained(out)
    tied = hf.config.tie_word_embeddings
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    Tokenizer.load(path)  # derives the tokenizer from the same file (cached)
    for f in derived_dir(path, "tokenizers").iterdir():
        shutil.copy(f, out / f.name)
    return out


QUICK = ["--batch-sizes", "1,2", "--output-len", "4", "--prefill-batch", "2", "--prefill-len", "16", "--repeats", "1"]


def vllm_python(vllm_dir: Path | None) -> str | None:
    """The Python that runs vLLM: the peer venv of --vllm-dir, else this one if it has vLLM."""
    if vllm_dir:
        python = vllm_dir / "venv" / "bin" / "python"
        return str(python) if python.exists() else None
    import importlib.util
    return sys.executable if importlib.util.find_spec("vllm") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores of compute per system (default: all)")
    ap.add_argument("--vllm-dir", type=Path, default=None,
                    help="folder made by bench/lab/peers/vllm-setup.sh (default: the vLLM installed here)")
    ap.add_argument("--vllm-dtypes", default="bfloat16,float32",
                    help="vLLM runs once per dtype (bf16 is its CPU default; fp32 is pdserve's)")
    ap.add_argument("--hf-dtype", default="float32")
    ap.add_argument("--hf-folder", type=Path, default=None,
                    help="SmolLM2 as an HF folder for HF and vLLM (default: --vllm-dir's, or converted from the GGUF)")
    ap.add_argument("--systems", default="pdserve,hf,vllm", help="which systems to run")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, one run each, vLLM eager: that every system runs, not a measurement")
    ap.add_argument("--result-json", type=Path, default=None)
    args = ap.parse_args(argv)
    systems = set(args.systems.split(","))
    extra = QUICK if args.quick else ["--batch-sizes", args.batch_sizes, "--output-len", str(args.output_len)]
    batch_sizes = extra[1].split(",")
    results = {}
    if "pdserve" in systems:
        results["pdserve"] = run_system(sys.executable, "pdserve", str(_default_gguf()), "float32", args.threads, extra)
    folder = hf_folder(args.vllm_dir, args.hf_folder)
    if "hf" in systems:
        results[f"hf-{_short(args.hf_dtype)}"] = run_system(sys.executable, "hf", folder, args.hf_dtype, args.threads,
                                                            extra)
    python = vllm_python(args.vllm_dir) if "vllm" in systems else None
    if python:
        cores = "0" if args.threads == 1 else f"0-{args.threads - 1}"
        for dtype in args.vllm_dtypes.split(","):
            results[f"vllm-{_short(dtype)}"] = run_system(
                python, "vllm", folder, dtype, args.threads, extra + (["--eager"] if args.quick else []),
                env={"VLLM_CPU_OMP_THREADS_BIND": cores, "HF_HUB_OFFLINE": "1",
                     "VLLM_CPU_KVCACHE_SPACE": "2", "TMPDIR": tempfile.mkdtemp()})
    elif "vllm" in systems:
        print("vLLM not found (install it here, or pass --vllm-dir DIR from bench/lab/peers/vllm-setup.sh): skipped",
              file=sys.stderr)
    print(table(results, batch_sizes))
    if args.result_json:
        args.result_json.write_text(json.dumps(results, indent=2))
    return 0 if results and all(r is not None for r in results.values()) else 1


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _default_gguf() -> Path:
    from engine.models.registry import default_model_path
    return default_model_path()


def table(results: dict, batch_sizes: list[str]) -> str:
    ours = results.get("pdserve")
    rows = [f"{'metric':<22}" + "".join(f"{name:>22}" for name in results)]
    metrics = [(f"decode tok/s, batch {b}", lambda r, b=b: r["decode_tok_s"][b]) for b in batch_sizes]
    metrics.append(("prefill tok/s", lambda r: r["prefill_tok_s"]))
    for label, get in metrics:
        cells = []
        for name, r in results.items():
            if r is None:
                cells.append(f"{'failed':>22}")
                continue
            value = get(r)
            ratio = "" if name == "pdserve" or not ours else f" ({get(ours) / value:.2f}x)"
            cells.append(f"{value:>12.1f}{ratio:>10}")
        rows.append(f"{label:<22}" + "".join(cells))
    rows.append("(x) = pdserve / peer; pdserve fp32 from the GGUF, peers on the same weights as an HF folder;")
    rows.append(f"{ours['threads'] if ours else '?'} core(s) of compute each; best of 2 runs per figure (--quick: one)")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
