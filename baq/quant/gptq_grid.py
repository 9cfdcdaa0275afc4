"""The symmetric grids GPTQ and round-to-nearest quantize on (`baq.quant.gptq`).

The grid is symmetric per output channel (or group) from the absmax, one of
GRIDS. "restricted" is baq's: scales and codes come from
`baq.quant.fake_quant`, codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; the element
of largest magnitude of each output channel (or group) is pinned to the code
+-qmax, so the channel's absmax, and so the scale that `fake_quant` derives
from the quantized weight, is unchanged: fake_quant(W_q) == W_q holds
exactly, and a vision model that fake-quantizes its kernels at inference
runs a GPTQ'd kernel unmoved. The pin is one more rounding choice whose
error GPTQ feeds back like any other. "full" is GPTQ's own (the reference
code, GPTQModel): scale 2 absmax / (2^b - 1), codes in [-2^(b-1), 2^(b-1) - 1],
all 2^b levels (the GPTQ format's zero point 2^(b-1), llama.cpp's q4_0); the
language-model path uses it (`baq.ptq.decoder_group.Options.grid`). With
scale_dtype="float16" each scale is rounded to float16 before any code is
chosen, so that formats storing fp16 scales (GGUF's blocks, GPTQ
checkpoints) hold the grid exactly.

Every flag here (`half`, `full`) may be traced, so one compiled program
serves every combination.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from baq.quant import fake_quant as fq

SCALE_DTYPES = ("float32", "float16")
# "restricted": baq's symmetric grid (fake_quant's), scale = absmax / (2^(b-1) - 1),
# codes in [-(2^(b-1) - 1), 2^(b-1) - 1], the channel's absmax pinned to +-qmax.
# "full": GPTQ's symmetric grid (the reference code, GPTQModel; the GPTQ format's
# zero point 2^(b-1), llama.cpp's q4_0), scale = 2 absmax / (2^b - 1), codes in
# [-2^(b-1), 2^(b-1) - 1]: all 2^b levels, a finer step (2 / 15 of the absmax
# against 1 / 7 at 4 bits).
GRIDS = ("restricted", "full")
# fp16's smallest subnormal and largest finite value: an empty channel's
# scale stays nonzero (its codes are 0 either way) and none overflows.
_F16_TINY, _F16_MAX = 2.0**-24, 65504.0


def is_half(scale_dtype: str) -> bool:
  """True for float16 scales; raises on an unknown scale_dtype (before any work)."""
  if scale_dtype not in SCALE_DTYPES:
    raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, "
                     f"got {scale_dtype!r}.")
  return scale_dtype == "float16"


def is_full(grid: str) -> bool:
  """True for the full grid; raises on an unknown grid (before any work)."""
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}.")
  return grid == "full"


def absmax_scale(hi: jax.Array, bits: jax.Array, half=False, full=False) -> jax.Array:
  """The symmetric scale for the absmax hi (broadcast against bits): fake_quant's,
  or the full grid's 2 hi / (2^b - 1) where `full`; rounded to float16 where
  `half` (traced flags: one compilation for every combination)."""
  # XLA rewrites x / broadcast(q) as x * (1 / q), an ulp off; bits shaped like
  # hi (through data, so it cannot fold) keeps the true IEEE division, which is
  # what fake_quant computes for per-channel bits.
  b = bits + 0.0 * hi
  s = fq.scale_and_zero_point(-hi, hi, b, True)[0]
  s = jnp.where(full & (hi > 0), (2.0 * hi) / (2.0 ** b - 1.0), s)
  s16 = jnp.clip(s.astype(jnp.float16).astype(jnp.float32), _F16_TINY, _F16_MAX)
  return jnp.where(half, s16, s)


def grid(w: jax.Array, bits: jax.Array, rows: Optional[jax.Array] = None, half=False,
         full=False):
  """The absmax scale of each column of w and the elements pinned to +-qmax.

  Args:
    w: [r, d_out] weights that share one scale per output channel.
    bits: [d_out] or scalar integer bit-widths.
    rows: optional [r] bool; only these rows set the scale and get pins.
    half: round the scales to float16 (a bool, traced or not).
    full: the full grid (`GRIDS`), which pins nothing (a bool, traced or not).

  Returns:
    scale [1, d_out], and pin [r, d_out]: on the restricted grid the sign of
    w where it holds its channel's absmax (the code there is forced to
    +-qmax), 0 elsewhere.
  """
  a = jnp.abs(w) if rows is None else jnp.where(rows[:, None], jnp.abs(w), 0.0)
  hi = jnp.max(a, axis=0, keepdims=True)
  pin = jnp.where(full, 0.0, jnp.sign(w) * (a == hi))
  return (absmax_scale(hi, bits, half, full),
          pin if rows is None else jnp.where(rows[:, None], pin, 0.0))


def static_grid(w, bits, group, half, full=False):
  """Per-row scales [d, m] and pins, one grid per `group` rows (0: all rows)."""
  d = w.shape[0]
  seg = jnp.arange(d) // jnp.where(group > 0, group, d)
  hi = jax.ops.segment_max(jnp.abs(w), seg, num_segments=d)[seg]
  return (absmax_scale(hi, bits, half, full),
          jnp.where(full, 0.0, jnp.sign(w) * (jnp.abs(w) == hi)))


def codes(w, scale, pin, bits, full=False):
  """Codes of w on its grid: the restricted grid's with the pinned elements at
  +-qmax, or the full grid's, which reach -(qmax + 1)."""
  _, qmax = fq.code_range(bits, True)
  free = fq.quantize_codes(w, scale, jnp.zeros_like(scale), bits, True)
  wide = jnp.clip(jnp.round(w / scale), -qmax - 1.0, qmax)  # the full grid: one more level
  return jnp.where(full, wide, jnp.where(pin != 0, pin * qmax, free))
