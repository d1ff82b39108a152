"""pdserve's engine: one model on one device (no Ray, no HTTP)."""

from engine.config import EngineConfig, Role
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "Role", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    raise AttributeError(name)
