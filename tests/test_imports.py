"""The import rules of the code's layout (the design's layering), checked on the source:

- the HTTP front door, the router, the global scheduler, the planner and the CLI start
  without torch (each imported in a fresh interpreter);
- the engine imports nothing from scheduler/ or bench/ (its text entry points only the
  tokenizer);
- the KV transports import only the transfer seam and the contracts (no engine internals);
- the load tester in bench/ imports nothing of the engine or the scheduler;
- contracts (the engine interface, its outputs and errors, the wire conversions) import no
  torch, even indirectly.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ["scheduler.api.server", "scheduler.router", "scheduler.global_scheduler", "scheduler.planner.cli",
              "scheduler.planner.plan", "scheduler.cli", "scheduler.disagg_client", "scheduler.engine_client",
              "scheduler.cluster", "scheduler.worker_actor", "bench.cli",
              "engine.interface", "engine.outputs", "engine.errors", "engine.worker.wire", "engine.parallel.shard",
              "engine.parallel.kv_link"]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative ones resolved, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append((node.lineno, module))
    return out


def violations(files: list[Path], forbidden) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in files for line, module in imports(path) if forbidden(module)]


def under(*parts: str) -> list[Path]:
    return sorted(ROOT.joinpath(*parts).rglob("*.py"))


def top(module: str) -> str:
    return module.split(".")[0]


CONTRACTS = ("engine.interface", "engine.outputs", "engine.errors")
# entry points that take text (the offline LLM, `pdserve kvpred`): they use the front door's tokenizer
# the parts of engine/ that read text: the offline API, the KV predictor's CLI, and constrained
# decoding (its grammars are compiled against the tokenizer's vocabulary)
TEXT_ENTRY_POINTS = ("engine/llm.py", "engine/kvpred/cli.py", "engine/grammar.py")


def test_the_engine_imports_nothing_from_the_scheduler_or_the_bench():
    core = [p for p in under("engine") if str(p.relative_to(ROOT)) not in TEXT_ENTRY_POINTS]
    assert violations(core, lambda m: top(m) in ("scheduler", "bench")) == []
    entry = [ROOT / p for p in TEXT_ENTRY_POINTS]
    assert violations(entry, lambda m: top(m) in ("scheduler", "bench") and m != "scheduler.tokenizer") == []


def test_transports_import_only_the_transfer_seam():
    assert violations(under("engine", "transfer"),
                      lambda m: top(m) == "engine" and not m.startswith(("engine.transfer", *CONTRACTS))) == []


def test_the_load_tester_imports_no_engine_or_scheduler_internals():
    tester = [p for p in under("bench") if "lab" not in p.relative_to(ROOT / "bench").parts]
    assert violations(tester, lambda m: top(m) in ("engine", "scheduler", "pdserve_rpc")) == []


def test_the_rules_see_a_violation():
    """The walker itself: a lazy import inside a function counts, relative imports resolve."""
    found = {m for _, m in imports(ROOT / "scheduler" / "worker_actor.py")}
    assert "engine.worker.build" in found and "ray" in found


@pytest.mark.parametrize("module", TORCH_FREE)
def test_starts_without_torch(module):
    code = (f"import sys; import {module}; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout, f"importing {module} loads torch"


def test_the_front_door_loads_a_generic_tokenizer_without_torch(tiny_llama):
    """What a disaggregated front door loads at start (the model's tokenizer) brings no torch
    in either, for transformers' generic fast tokenizer (the default model's, cached)."""
    code = ("import sys; from pathlib import Path; from scheduler.tokenizer import Tokenizer; "
            f"t = Tokenizer.load(Path({str(tiny_llama)!r})); assert t.encode('hello world'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
