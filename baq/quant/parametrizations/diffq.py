"""`diffq`: DiffQ-style pseudo-quantization noise of one step at the (fractional) bit-width.

x + step(b) * U(-1/2, 1/2) in place of rounding; the step depends smoothly
on b, so the task loss gives every bit-width a gradient
(`fake_quant.noise_quant`).
"""

from baq.quant import fake_quant
from baq.quant.parametrizations import register


@register("diffq", trains_bits=True, needs_rng=True)
def diffq(x, bits, key, **kw):
  return fake_quant.noise_quant(x, bits, key, **kw)
