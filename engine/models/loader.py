"""Weight loading: HF safetensors folders (sharded too) and GGUF files (dequantised).

Both sources are turned into HF tensor names, then fused into the model's layout
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) as the parts arrive. A tensor-parallel rank
keeps only its shard of each tensor as it arrives (engine/parallel/shard.py): it never holds
more of the model than its shard and the one tensor being read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.models.config import ModelConfig, gguf_field
from engine.models.llama import LlamaModel, Rotary
from engine.models.registry import derived_dir, publish
from engine.parallel.shard import Shard

_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_NUM_PARTS = {"qkv_proj": 3, "gate_up_proj": 2}


@dataclass
class WeightSource:
    """A model's config and a one-pass iterator over its tensors under HF names."""

    config: ModelConfig
    tensors: Iterator[tuple[str, torch.Tensor]]


def open_weights(path: str | Path) -> WeightSource:
    """A GGUF file is parsed and dequantized once (seconds: its metadata alone is slow to
    read); its float32 weights and config are then cached as safetensors and read from there."""
    path = Path(path)
    if path.suffix == ".gguf":
        cached = derived_dir(path, "weights")
        if not (cached / "model.safetensors").exists():
            import gguf
            reader = gguf.GGUFReader(path)
            cfg = ModelConfig.from_gguf(reader)
            tensors = dict(_gguf_tensors(reader, cfg))
            publish(cached, lambda tmp: _write_weights(tmp, cfg, tensors))
            if not (cached / "model.safetensors").exists():  # not writable: use them as they are
                return WeightSource(cfg, iter(tensors.items()))
        cfg = ModelConfig.from_json(json.loads((cached / "pdserve_config.json").read_text()))
        return WeightSource(cfg, _safetensors(cached))
    return WeightSource(ModelConfig.from_hf_folder(path), _safetensors(path))


def _write_weights(folder: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "pdserve_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))


def load_model(source: WeightSource, dtype: torch.dtype, device: torch.device, max_len: int,
               shard: Shard | None = None) -> LlamaModel:
    cfg, tensors = source.config, source.tensors
    shard = shard or Shard(cfg)
    rotary = Rotary(cfg, max_len, device)
    with torch.device("meta"):
        model = LlamaModel(cfg, rotary, shard)
    model = model.to_empty(device=device).to(dtype=dtype)
    _assign(model, tensors, dtype, device, shard)
    return model.eval().requires_grad_(False)


def _assign(model: LlamaModel, tensors: Iterator[tuple[str, torch.Tensor]], dtype, device, shard: Shard) -> None:
    params = dict(model.named_parameters())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    for name, full in tensors:
        name = _moe_name(name.removeprefix("model."))
        tensor = _part(name, full, shard)
        if "rotary_emb" in name or tensor is None:
            continue
        match = re.match(r"(layers\.\d+\.(?:self_attn|mlp|moe)\.(?:(?:experts\.\d+|shared_expert)\.)?)(\w+)\.(weight|bias)$",
                         name)
        if match and match.group(2) in _FUSED:
            fused, part = _FUSED[match.group(2)]
            key = f"{match.group(1)}{fused}.{match.group(3)}"
            parts = pending.setdefault(key, {})
            parts[part] = tensor
            if len(parts) < _NUM_PARTS[fused]:
                continue
            name, tensor = key, torch.cat([parts[i] for i in sorted(parts)], dim=0)
            del pending[key]
        name = re.sub(r"\.(self_attn|mlp)\.", ".", name)
        if name == "lm_head.weight" and model.lm_head is None:
            continue
        if name not in params:
            raise ValueError(f"unexpected weight {name}")
        with torch.no_grad():
            params[name].copy_(tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    missing = set(params) - loaded
    if pending or missing:
        raise ValueError(f"incomplete weights: missing {sorted(missing)[:5]} pending {sorted(pending)[:5]}")


_SHARDED = re.compile(r"layers\.\d+\.(?:self_attn|mlp|moe)\.(?:experts\.(\d+)\.|(shared_expert)\.)?(\w+)\.(?:weight|bias)$")


def _part(name: str, tensor: torch.Tensor, shard: Shard) -> torch.Tensor | None:
    """The shard's part of the HF-named tensor (a view), or None when the rank holds none of it:
    query heads, KV heads and MLP width split (column-parallel rows, row-parallel columns),
    experts whole or not at all; everything else (embeddings, norms, router) replicated."""
    match = _SHARDED.match(name) if shard.size > 1 else None
    if match is None:
        return tensor
    expert, shared, proj = match.groups()
    d = shard.cfg.head_dim
    if expert is not None:
        return tensor if shard.holds_expert(int(expert)) else None
    if proj == "q_proj":
        return tensor.narrow(0, shard.first_head * d, shard.num_heads * d)
    if proj in ("k_proj", "v_proj"):
        return tensor.narrow(0, shard.first_kv_head * d, shard.num_kv_heads * d)
    if proj == "o_proj":
        return tensor.narrow(1, shard.first_head * d, shard.num_heads * d)
    width = shard.width(shard.cfg.shared_expert_intermediate_size if shared else shard.cfg.intermediate_size)
    if proj in ("gate_proj", "up_proj"):
        return tensor.narrow(0, width.start, len(width))
    if proj == "down_proj":
        return tensor.narrow(1, width.start, len(width))
    return tensor


def _moe_name(name: str) -> str:
    """Mixtral's and Qwen-MoE's expert weights under the model's names: layers.N.moe.gate,
    layers.N.moe.experts.E.{gate,up,down}_proj, layers.N.moe.shared_expert(_gate)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    match = re.match(r"(layers\.\d+)\.mlp\.(gate|experts|shared_expert|shared_expert_gate)\.(.*)$", name)
    if not match:
        return name
    rest = re.sub(r"^(\d+)\.w([123])\.", lambda m: f"{m.group(1)}.{_MIXTRAL[m.group(2)]}.", match.group(3))
    return f"{match.group(1)}.moe.{match.group(2)}.{rest}"


_MIXTRAL = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def _safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# GGUF ----------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of Q/K rows for its rope layout (HF order back)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf
    permuted = gguf_field(reader, "general.architecture") in ("llama", "mistral")
    for t in reader.tensors:
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if not match or match.group(2) not in _GGUF_LAYER:
                raise ValueError(f"unexpected GGUF tensor {t.name}")
            name = f"layers.{match.group(1)}.{_GGUF_LAYER[match.group(2)]}.{match.group(3)}"
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        data = data.reshape([int(d) for d in reversed(t.shape)])
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _unpermute(data, cfg.num_heads)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            data = _unpermute(data, cfg.num_kv_heads)
        yield name, torch.from_numpy(np.array(data, dtype=np.float32))
