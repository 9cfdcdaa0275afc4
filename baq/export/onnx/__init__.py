"""ONNX export: a jaxpr interpreter (`graph`, `ops`) and baq's models on it (`model`)."""

from baq.export.onnx.model import SESSION_MODES, code_type, run, session, to_onnx

__all__ = ["SESSION_MODES", "code_type", "run", "session", "to_onnx"]
