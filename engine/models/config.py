"""Model architecture description, read from an HF config.json or GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "ModelConfig":
        raw = json.loads((folder / "config.json").read_text())
        archs = raw.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs}; supported: {sorted(ARCHITECTURES)}")
        heads = raw["num_attention_heads"]
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        theta = raw.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else tuple(sorted((k, v) for k, v in scaling.items() if k != "rope_theta"))
        eos = raw.get("eos_token_id")
        gen = folder / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        window = raw.get("sliding_window") if raw.get("use_sliding_window", arch == "mistral") else None
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", arch == "qwen2"),
            qk_norm=arch == "qwen3",
            rope_scaling=scaling,
            sliding_window=window,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )
