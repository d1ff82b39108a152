"""The HF folder vLLM loads: the model itself when it is one, or, for a .gguf file (the
default model among them), its weights dequantized into safetensors (bfloat16) with its
config and tokenizer, written once into pdserve's cache beside the other derived files."""

from __future__ import annotations

from pathlib import Path

from engine.models.registry import derived_dir, publish, resolve_model_path


def hf_folder(model: str | None) -> Path:
    path = resolve_model_path(model)
    if path.is_dir():
        return path
    folder = derived_dir(path, "hf")
    if not (folder / "config.json").exists():
        publish(folder, lambda tmp: _convert(path, tmp))
    return folder


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain checkpoint
        del config.quantization_config
    clean = type(model)(config)
    _, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"{gguf}: weights the model does not have: {unexpected[:5]}")
    clean.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
