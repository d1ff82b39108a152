from engine.transfer.base import KVSink, LayerChunk

__all__ = ["KVSink", "LayerChunk"]
