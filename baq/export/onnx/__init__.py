"""ONNX export: a jaxpr interpreter (`graph`, `ops`) and baq's models on it (`model`)."""

from baq.export.onnx.model import code_type, run, session, to_onnx

__all__ = ["code_type", "run", "session", "to_onnx"]
