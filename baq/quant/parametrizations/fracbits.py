"""`fracbits`: FracBits-style interpolation between the quantizers at floor(b) and floor(b)+1.

Q(x; b) = (1 - f) Q(x; floor b) + f Q(x; floor b + 1) with f = b - floor b,
so the bit gradient is Q(x; floor b + 1) - Q(x; floor b) (`fake_quant.fracbits_quant`).

A known flaw, measured (tests/test_fake_quant.py): the interpolation is a
convex mix of two quantizers whose errors partly cancel, so its error is
not monotone in b. For a Gaussian 3x3x64x128 kernel it is lowest near
f = 0.8 of each integer interval, and lower at k + 0.8 than at k + 1 for
every k in 2..7:
over roughly the top fifth of each interval the quantization error pushes
the bit-width *down*, towards a value that then deploys (rounded) one bit
lower or higher than the search meant. `diffq` (the default) has no such
interval: its noise grows monotonically as b falls.
"""

from baq.quant import fake_quant
from baq.quant.parametrizations import register


@register("fracbits", trains_bits=True)
def fracbits(x, bits, key, **kw):
  del key
  return fake_quant.fracbits_quant(x, bits, **kw)
