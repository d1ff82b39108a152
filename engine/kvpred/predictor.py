"""KV predictor: an auxiliary model plus, for every base layer, linear maps from one
auxiliary layer's K and V to the base layer's (TECHNIQUES.md, KV prediction).

The auxiliary model reads the prompt (all but its last token); base layer l reads auxiliary
layer `source_layers[l]`. Keys are predicted before rotary embedding: the base rotates them
at their positions as it would its own (`rotate`). Two auxiliary models:
- every-other-layer: the base's layers 0, 2, 4, ... with its embeddings and head, initialised
  from the base; base layer l reads auxiliary layer l // 2, and the maps start as identities
  (exact for even layers at initialisation);
- a path: a smaller model of the same family sharing the tokenizer; layer l reads auxiliary
  layer l * A // B.
Saved as a folder: `kvpred.json` (what it is, how far it trained) and `predictor.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from engine.kvpred.dense import KV, forward_dense
from engine.models.config import ModelConfig
from engine.models.llama import LlamaModel, Rotary
from engine.models.loader import load_model, open_weights

EVERY_OTHER_LAYER = "every-other-layer"
WEIGHT_LAYOUT = "out-in"  # how the auxiliary model's projection weights are saved: torch's [out, in]


@dataclass(frozen=True)
class PredictorInfo:
    base: str                         # the base model it predicts for
    aux: str                          # every-other-layer, or the auxiliary model's path
    aux_config: dict                  # the auxiliary model's ModelConfig
    source_layers: tuple[int, ...]    # per base layer: the auxiliary layer its maps read
    max_len: int


class KVPredictor(nn.Module):
    def __init__(self, aux: LlamaModel, base_cfg: ModelConfig, info: PredictorInfo):
        super().__init__()
        self.aux, self.info, self.base_cfg = aux, info, base_cfg
        kv_aux = aux.cfg.num_kv_heads * aux.cfg.head_dim
        kv_base = base_cfg.num_kv_heads * base_cfg.head_dim
        self.k_maps = nn.ModuleList(nn.Linear(kv_aux, kv_base) for _ in info.source_layers)
        self.v_maps = nn.ModuleList(nn.Linear(kv_aux, kv_base) for _ in info.source_layers)
        if kv_aux == kv_base:
            for m in (*self.k_maps, *self.v_maps):
                nn.init.eye_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def every_other_layer(cls, base: LlamaModel, base_path: str, max_len: int) -> KVPredictor:
        cfg = base.cfg
        layers = list(range(0, cfg.num_layers, 2))
        aux_cfg = replace(cfg, num_layers=len(layers))
        aux = LlamaModel(aux_cfg, base.rotary).to(base.embed_tokens.weight.dtype)
        aux.embed_tokens.load_state_dict(base.embed_tokens.state_dict())
        aux.norm.load_state_dict(base.norm.state_dict())
        if aux.lm_head is not None:
            aux.lm_head.load_state_dict(base.lm_head.state_dict())
        for i, src in enumerate(layers):
            aux.layers[i].load_state_dict(base.layers[src].state_dict())
        info = PredictorInfo(base_path, EVERY_OTHER_LAYER, _as_json(aux_cfg),
                             tuple(i // 2 for i in range(cfg.num_layers)), max_len)
        return cls(aux.requires_grad_(True), cfg, info)

    @classmethod
    def from_model(cls, base_cfg: ModelConfig, base_path: str, aux_path: str, max_len: int) -> KVPredictor:
        aux = load_model(open_weights(aux_path), torch.float32, torch.device("cpu"), max_len)
        if aux.cfg.vocab_size != base_cfg.vocab_size:
            raise ValueError(f"the auxiliary model's vocabulary ({aux.cfg.vocab_size}) differs from the base's "
                             f"({base_cfg.vocab_size}): it must share the tokenizer")
        a, b = aux.cfg.num_layers, base_cfg.num_layers
        info = PredictorInfo(base_path, str(aux_path), _as_json(aux.cfg), tuple(i * a // b for i in range(b)), max_len)
        return cls(aux.train().requires_grad_(True), base_cfg, info)

    def predict(self, prompt_ids: torch.Tensor) -> tuple[list[KV], torch.Tensor]:
        """Per base layer (keys before rotary, values) of the prompt's tokens, and the
        auxiliary model's final hidden states (for its own language-model loss)."""
        hidden, captured = forward_dense(self.aux, prompt_ids, dtype=self.aux.embed_tokens.weight.dtype)
        cfg, n = self.base_cfg, prompt_ids.shape[0]
        out = []
        for layer, src in enumerate(self.info.source_layers):
            k, v = captured[src]
            out.append((self.k_maps[layer](k.reshape(n, -1)).view(n, cfg.num_kv_heads, cfg.head_dim),
                        self.v_maps[layer](v.reshape(n, -1)).view(n, cfg.num_kv_heads, cfg.head_dim)))
        return out, hidden

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "predictor.safetensors.tmp"))
        (folder / "predictor.safetensors.tmp").replace(folder / "predictor.safetensors")
        meta = {**asdict(self.info), "weight_layout": WEIGHT_LAYOUT, **(extra or {})}
        (folder / "kvpred.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path, base_cfg: ModelConfig, device: torch.device = torch.device("cpu"),
             max_len: int | None = None) -> tuple[KVPredictor, dict]:
        """The predictor saved in folder, and the rest of its kvpred.json (e.g. the step);
        max_len: the longest prompt it will read (default: its training windows')."""
        from safetensors.torch import load_file
        folder = Path(folder)
        if not (folder / "kvpred.json").is_file():
            raise ValueError(f"{folder} holds no KV predictor (no kvpred.json): train one with pdserve kvpred train")
        meta = json.loads((folder / "kvpred.json").read_text())
        if meta.pop("weight_layout", None) != WEIGHT_LAYOUT:
            raise ValueError(f"{folder} holds a KV predictor saved by an older pdserve (projection weights "
                             "stored [in, out]): train it again with pdserve kvpred train")
        fields = {f: meta.pop(f) for f in PredictorInfo.__dataclass_fields__}
        aux_raw = dict(fields["aux_config"])
        aux_raw["rope_scaling"] = tuple(tuple(p) for p in aux_raw["rope_scaling"]) if aux_raw["rope_scaling"] else None
        for key in ("eos_token_ids", "dense_layers"):
            aux_raw[key] = tuple(aux_raw[key])
        info = PredictorInfo(**{**fields, "source_layers": tuple(fields["source_layers"])})
        aux_cfg = ModelConfig(**aux_raw)
        aux = LlamaModel(aux_cfg, Rotary(aux_cfg, max(info.max_len, max_len or 0), device))
        predictor = cls(aux, base_cfg, info)
        try:
            predictor.load_state_dict(load_file(str(folder / "predictor.safetensors")))
        except RuntimeError as e:
            raise ValueError(f"{folder} does not hold a predictor for this base model: {e}") from None
        return predictor.to(device), meta


def _as_json(cfg: ModelConfig) -> dict:
    """The config as kvpred.json stores it (tuples become lists), so saved and live compare equal."""
    return json.loads(json.dumps(asdict(cfg)))
