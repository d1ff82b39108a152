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
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


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
    # mixture of experts (num_experts 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP in an MoE model

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_json(cls, raw: dict) -> "ModelConfig":
        """The inverse of dataclasses.asdict (JSON has lists where the config has tuples)."""
        tuples = {"eos_token_ids": tuple, "dense_layers": tuple,
                  "rope_scaling": lambda v: None if v is None else tuple(tuple(kv) for kv in v)}
        return cls(**{k: tuples[k](v) if k in tuples else v for k, v in raw.items()})

    @classmethod
    def from_gguf(cls, reader) -> "ModelConfig":
        """From a GGUF file's metadata (a gguf.GGUFReader)."""
        arch = gguf_field(reader, "general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}")
        p = f"{arch}."
        heads = gguf_field(reader, p + "attention.head_count")
        hidden = gguf_field(reader, p + "embedding_length")
        names = {t.name for t in reader.tensors}
        vocab = gguf_field(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
        return cls(
            architecture=GGUF_ARCHITECTURES[arch], vocab_size=vocab, hidden_size=hidden,
            intermediate_size=gguf_field(reader, p + "feed_forward_length"),
            num_layers=gguf_field(reader, p + "block_count"), num_heads=heads,
            num_kv_heads=gguf_field(reader, p + "attention.head_count_kv", heads),
            head_dim=gguf_field(reader, p + "attention.key_length", hidden // heads),
            rms_norm_eps=gguf_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=float(gguf_field(reader, p + "rope.freq_base", 10000.0)),
            max_position_embeddings=gguf_field(reader, p + "context_length", 4096),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
            eos_token_ids=() if eos is None else (int(eos),),
            bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        )

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
        window = raw.get("sliding_window") if raw.get("use_sliding_window", arch in ("mistral", "mixtral")) else None
        experts = raw.get("num_local_experts") or raw.get("num_experts") or 0
        step = raw.get("decoder_sparse_step") or 1
        dense_layers = tuple(i for i in range(raw["num_hidden_layers"])
                             if i in (raw.get("mlp_only_layers") or []) or (i + 1) % step)
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
            attention_bias=next((raw[k] for k in ("attention_bias", "qkv_bias") if raw.get(k) is not None),
                                arch in ("qwen2", "qwen2_moe")),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            rope_scaling=scaling,
            sliding_window=window,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            num_experts=experts,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            moe_intermediate_size=raw.get("moe_intermediate_size") or (raw["intermediate_size"] if experts else 0),
            norm_topk_prob=arch == "mixtral" or bool(raw.get("norm_topk_prob")),
            shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size") or 0,
            dense_layers=dense_layers if experts else (),
        )


def read_config(path: Path) -> ModelConfig:
    """The config of an HF folder or a GGUF file (its metadata only: the weights are not read;
    a GGUF already converted by the loader answers from the conversion's cache)."""
    if path.suffix != ".gguf":
        return ModelConfig.from_hf_folder(path)
    from engine.models.registry import derived_dir
    cached = derived_dir(path, "weights") / "pdserve_config.json"
    if cached.exists():
        return ModelConfig.from_json(json.loads(cached.read_text()))
    import gguf
    return ModelConfig.from_gguf(gguf.GGUFReader(path))
