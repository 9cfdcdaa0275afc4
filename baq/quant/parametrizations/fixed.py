"""`fixed`: the bit-width is rounded and held (uniform QAT and deployment).

The kernel is fake-quantized at round(bits) with a straight-through gradient
for the weights; the bit-width itself gets none.
"""

import jax
import jax.numpy as jnp

from baq.quant import fake_quant
from baq.quant.parametrizations import register


@register("fixed", trains_bits=False)
def fixed(x, bits, key, **kw):
  del key
  return fake_quant.fake_quant(x, jax.lax.stop_gradient(jnp.round(bits)), **kw)
