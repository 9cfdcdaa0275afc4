"""The scale searches of llama.cpp's k-quants (ggml-quants.c), for numpy and jax.numpy alike.

Every function takes `xp` (numpy or jax.numpy) and works on a batch of
groups, one group a row ([N, n]), computing what the C reference computes for
each group in float32, in its order: products and sums are rounded one
operation at a time as ggml-base compiles them (x86-64 without FMA), the
sums run left to right (`seqsum`), a division by a constant stays a
division (`div`), and `nearest_int` is the C magic-number trick bit for bit.
Loops whose steps depend on each other run through `loop` (a Python loop on
numpy, `lax.fori_loop` on jax.numpy).

  * `make_qkx2_quants`: an asymmetric grid (scale, min) per group, searched
    over nstep + 1 candidate scales (Q2_K, Q4_K, Q5_K);
  * `make_qx_quants` (rmse_type 1, no importance): a symmetric grid, searched
    over 18 candidate scales (Q6_K);
  * `make_q3_quants` (do_rmse): a symmetric grid refined code by code (Q3_K).
"""

from __future__ import annotations

import numpy as np
from jax import lax

from baq.quant.numerics._common import _rounded

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: an all-zero group below this


def f32(v) -> np.float32:
  """A C float constant (or a float expression of constants, rounded once)."""
  return np.float32(v)


def barrier(xp, a):
  """a, rounded on its own: XLA may not fuse this product into an FMA (one rounding
  where C rounds twice); `_common._rounded` is the select it does not see through."""
  return a if xp is np else _rounded(a)


def div(xp, a, c):
  """a / c for a constant c: a runtime divisor, which XLA does not turn into a * (1 / c)."""
  return a / (f32(c) + (F32(0) * a if xp is not np else F32(0)))


def nearest_int(xp, v):
  """ggml's nearest_int: the bits of fl32(v + 12582912), also beyond its assert (|v| > 2^22)."""
  s = (v + F32(12582912.0)).astype(F32)
  bits = s.view(np.int32) if xp is np else lax.bitcast_convert_type(s, np.int32)
  return (bits & 0x007FFFFF) - 0x00400000


def seqsum(xp, t):
  """t[..., 0] + t[..., 1] + ... in float32, left to right, as a C loop sums."""
  if xp is np:
    return np.add.accumulate(t, axis=-1, dtype=F32)[..., -1]
  acc = t[..., 0]
  for i in range(1, t.shape[-1]):
    acc = acc + t[..., i]
  return acc


def loop(xp, n: int, body, carry):
  """carry = body(i, carry) for i in range(n): sequential steps."""
  if xp is not np:
    return lax.fori_loop(0, n, body, carry)
  for i in range(n):
    carry = body(i, carry)
  return carry


def first_absmax(xp, x):
  """(the value with the largest |x| of each group, the first one on ties; that |x|).

  An all-zero group gives +0.0, as the C loop's `max = 0` (never replaced)
  does; gguf.quants takes the first element, -0.0 in a group of negative
  zeros, and its Q4_0/Q5_0 scale then differs from ggml's in its sign bit.
  """
  i = xp.argmax(xp.abs(x), axis=-1)
  mx = xp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
  mx = xp.where(mx != 0, mx, F32(0))
  return mx, xp.abs(mx)


def make_qkx2_quants(xp, x, weights, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
  """make_qkx2_quants: codes, scale and -min of the best asymmetric grid of each group.

  Args:
    xp: numpy or jax.numpy.
    x, weights: float32 [N, n] groups and their error weights.
    nmax: the largest code; rmin, rdelta, nstep: the candidate scales
      (rmin + rdelta * is + nmax) / (max - min), is = 0..nstep, min the best
      one so far (the reference updates it inside its loop).
    use_mad: absolute (True) or squared error.

  Returns:
    (L int32 [N, n] in [0, nmax], scale float32 [N], the_min float32 [N] = -min).
  """
  err = (lambda d: xp.abs(d)) if use_mad else (lambda d: d * d)
  lo = xp.minimum(xp.min(x, axis=-1), F32(0))
  hi = xp.max(x, axis=-1)
  flat = hi == lo
  span = xp.where(flat, F32(1), hi - lo)
  sum_w, sum_x = seqsum(xp, weights), seqsum(xp, barrier(xp, weights * x))
  iscale = F32(nmax) / span
  scale = F32(1) / iscale
  L = xp.clip(nearest_int(xp, barrier(xp, iscale[:, None] * (x - lo[:, None]))), 0, nmax)
  diff = barrier(xp, scale[:, None] * L.astype(F32)) + lo[:, None] - x
  best = seqsum(xp, barrier(xp, weights * err(diff)))
  steps = xp.asarray(np.array([f32(f32(f32(rmin) + f32(f32(rdelta) * F32(i))) + F32(nmax))
                               for i in range(nstep + 1)], F32))

  def step(i, carry):
    best, scale, mn, L = carry  # the C loop grids from the best min so far
    iscale = steps[i] / xp.where(flat, F32(1), hi - mn)
    la = xp.clip(nearest_int(xp, barrier(xp, iscale[:, None] * (x - mn[:, None]))), 0, nmax)
    lf = la.astype(F32)
    wl = barrier(xp, weights * lf)
    sum_l, sum_l2 = seqsum(xp, wl), seqsum(xp, barrier(xp, wl * lf))
    sum_xl = seqsum(xp, barrier(xp, wl * x))
    D = barrier(xp, sum_w * sum_l2) - barrier(xp, sum_l * sum_l)
    safe = xp.where(D > 0, D, F32(1))
    this_scale = (barrier(xp, sum_w * sum_xl) - barrier(xp, sum_x * sum_l)) / safe
    this_min = (barrier(xp, sum_l2 * sum_x) - barrier(xp, sum_l * sum_xl)) / safe
    clamp = this_min > 0
    this_min = xp.where(clamp, F32(0), this_min)
    this_scale = xp.where(clamp, sum_xl / xp.where(sum_l2 != 0, sum_l2, F32(1)), this_scale)
    diff = barrier(xp, this_scale[:, None] * lf) + this_min[:, None] - x
    cur = seqsum(xp, barrier(xp, weights * err(diff)))
    take = (D > 0) & (cur < best)
    return (xp.where(take, cur, best), xp.where(take, this_scale, scale),
            xp.where(take, this_min, mn), xp.where(take[:, None], la, L))

  _, scale, mn, L = loop(xp, nstep + 1, step, (best, scale, lo, L))
  return (xp.where(flat[:, None], 0, L).astype(np.int32), xp.where(flat, F32(0), scale),
          -xp.where(flat, lo, mn))


def _sums(xp, x, l):
  """(sum of x^2 x l, sum of x^2 l l) over each group: make_qx/q3_quants' weighted sums."""
  w = barrier(xp, x * x)
  lf = l.astype(F32)
  return (seqsum(xp, barrier(xp, barrier(xp, w * x) * lf)),
          seqsum(xp, barrier(xp, barrier(xp, w * lf) * lf)))


def make_qx_quants(xp, x, nmax: int):
  """make_qx_quants(rmse_type=1, qw=NULL): codes and scale of each group's symmetric grid.

  Returns:
    (L int32 [N, n] in [0, 2 nmax), 0 for an all-zero group; scale float32 [N]).
  """
  mx, amax = first_absmax(xp, x)
  zero = amax < GROUP_MAX_EPS
  mx = xp.where(zero, F32(1), mx)

  def grid(iscale):
    return xp.clip(nearest_int(xp, barrier(xp, iscale[:, None] * x)), -nmax, nmax - 1)

  l = grid(F32(-nmax) / mx)
  sumlx, suml2 = _sums(xp, x, l)
  scale = xp.where(suml2 != 0, sumlx / xp.where(suml2 != 0, suml2, F32(1)), F32(0))
  best = scale * sumlx
  tries = xp.asarray(np.array([-f32(F32(nmax) + f32(F32(0.1) * F32(i)))
                               for i in range(-9, 10) if i], F32))

  def step(i, carry):
    best, scale, L = carry
    li = grid(tries[i] / mx)
    slx, sl2 = _sums(xp, x, li)
    take = (sl2 > 0) & (barrier(xp, slx * slx) > barrier(xp, best * sl2))
    new_scale = slx / xp.where(take, sl2, F32(1))
    return (xp.where(take, barrier(xp, new_scale * slx), best), xp.where(take, new_scale, scale),
            xp.where(take[:, None], li, L))

  _, scale, l = loop(xp, 18, step, (best, scale, l))
  return xp.where(zero[:, None], 0, l + nmax).astype(np.int32), xp.where(zero, F32(0), scale)


def make_q3_quants(xp, x, nmax: int, passes: int = 5):
  """make_q3_quants(do_rmse=true): a symmetric grid, then code-by-code refinement.

  A pass that changes no code leaves the state as it was, so running all
  `passes` equals the C loop's early exit.

  Returns:
    (L int32 [N, n] in [0, 2 nmax), 0 for an all-zero group; scale float32 [N]).
  """
  mx, amax = first_absmax(xp, x)
  zero = amax < GROUP_MAX_EPS
  mx = xp.where(zero, F32(1), mx)
  n = x.shape[-1]
  L = xp.clip(nearest_int(xp, barrier(xp, (F32(-nmax) / mx)[:, None] * x)), -nmax, nmax - 1)
  sumlx, suml2 = _sums(xp, x, L)
  cols = xp.arange(n)

  def step(k, carry):
    L, sumlx, suml2 = carry
    i = k % n
    xi = x[:, i]
    li = L[:, i].astype(F32)
    w = barrier(xp, xi * xi)
    wx = barrier(xp, w * xi)
    slx = sumlx - barrier(xp, wx * li)
    pos = slx > 0
    sl2 = suml2 - barrier(xp, barrier(xp, w * li) * li)
    q = barrier(xp, xi * sl2) / xp.where(pos, slx, F32(1))
    new = xp.clip(nearest_int(xp, q), -nmax, nmax - 1)
    nf = new.astype(F32)
    slx = slx + barrier(xp, wx * nf)
    sl2 = sl2 + barrier(xp, barrier(xp, w * nf) * nf)
    better = (barrier(xp, barrier(xp, slx * slx) * suml2) >
              barrier(xp, barrier(xp, sumlx * sumlx) * sl2))
    take = pos & (new != L[:, i]) & (sl2 > 0) & better
    L = xp.where((cols == i)[None, :] & take[:, None], new[:, None], L)
    return L, xp.where(take, slx, sumlx), xp.where(take, sl2, suml2)

  L, sumlx, suml2 = loop(xp, passes * n, step, (L, sumlx, suml2))
  scale = xp.where(suml2 > 0, sumlx / xp.where(suml2 > 0, suml2, F32(1)), F32(0))
  return xp.where(zero[:, None], 0, L + nmax).astype(np.int32), xp.where(zero, F32(0), scale)
