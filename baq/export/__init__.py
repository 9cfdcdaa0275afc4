"""Deployment exports of a quantized baq model.

  baq.export.packed       integer codes bit-packed at each unit's bit-width,
                          scales, zero points and the allocation, in
                          safetensors (baq's own reader: `read_packed`)
  baq.export.allocation   the bit allocation record (bit_allocation.json) and plot
  baq.export.onnx         an ONNX graph with integer weights behind
                          DequantizeLinear at each layer's bit-width, and
                          activation QuantizeLinear/DequantizeLinear pairs,
                          for onnxruntime
  baq.export.qwix         the allocation as Qwix quantization rules

`baq.experiment.deploy` runs them on a finished workdir (`eval.py --export=...`).
"""
