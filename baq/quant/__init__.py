"""Quantization: pure fake-quant functions, Flax injection, bit units, export."""

from baq.quant.inject import Conv, Dense, QuantMode, Quantizer, QuantSpec

__all__ = ["Conv", "Dense", "QuantMode", "Quantizer", "QuantSpec"]
