"""`diffq_ste`: the deployed quantizer in the forward pass, DiffQ's noise for the bit gradient.

    forward  Q(x; round b)                      (the rounding quantizer, as deployed)
    d/dx     straight-through, as in QAT
    d/db     that of DiffQ's pseudo-quantization noise x + step(b) U(-1/2, 1/2)

The weights train against the integer quantizer that evaluation and export
use from the first step, as uniform QAT's and `fair_static_qat`'s do, while
the bit-widths still get DiffQ's smooth signal (the noise is drawn with x
held constant, so it adds no gradient to the weights). `diffq` trains the
weights under noise instead, whose effect at 2-3 bits is far from that of
rounding (a 2-bit absmax grid is ternary: most weights round to zero), and
leaves them to adapt to the true quantizer only after the bits are frozen.
"""

import jax
import jax.numpy as jnp

from baq.quant import fake_quant
from baq.quant.parametrizations import register


@register("diffq_ste", trains_bits=True, needs_rng=True)
def diffq_ste(x, bits, key, **kw):
  hard = fake_quant.fake_quant(x, jax.lax.stop_gradient(jnp.round(bits)), **kw)
  noisy = fake_quant.noise_quant(jax.lax.stop_gradient(x), bits, key, **kw)
  return hard + (noisy - jax.lax.stop_gradient(noisy))
