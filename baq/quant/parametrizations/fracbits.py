"""`fracbits`: FracBits-style interpolation between the quantizers at floor(b) and floor(b)+1.

Q(x; b) = (1 - f) Q(x; floor b) + f Q(x; floor b + 1) with f = b - floor b,
so the bit gradient is Q(x; floor b + 1) - Q(x; floor b) (`fake_quant.fracbits_quant`).
"""

from baq.quant import fake_quant
from baq.quant.parametrizations import register


@register("fracbits", trains_bits=True)
def fracbits(x, bits, key, **kw):
  del key
  return fake_quant.fracbits_quant(x, bits, **kw)
