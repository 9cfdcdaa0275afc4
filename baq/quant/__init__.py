"""Quantization: pure fake-quant functions, Flax injection, bit units, export."""

from baq.quant.inject import Conv, Dense, Quantizer, QuantSpec

__all__ = ["Conv", "Dense", "Quantizer", "QuantSpec"]
