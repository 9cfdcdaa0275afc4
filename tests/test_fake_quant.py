"""Fake quantization as mathematics: grids, error bounds, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.quant import fake_quant as fq


def _x(shape=(6, 5, 8), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * jnp.arange(1, shape[-1] + 1)


def _grid_np(x, bits, symmetric, channel_axis):
  """The absmax grid in float32 numpy, from the definitions alone:
  (scale, zero point, lowest code, highest code), broadcastable against x.

  Symmetric: step max|x| / (2^(b-1) - 1), codes -(2^(b-1) - 1) .. 2^(b-1) - 1,
  zero point 0. Asymmetric: the range [min(x, 0), max(x, 0)] over 2^b - 1
  steps, codes 0 .. 2^b - 1, zero point round(-lo / step).
  """
  x = np.asarray(x, np.float32)
  axes = None if channel_axis is None else tuple(
      a for a in range(x.ndim) if a != channel_axis % x.ndim)
  if symmetric:
    qmax = np.float32(2 ** (bits - 1) - 1)
    return np.abs(x).max(axes, keepdims=True) / qmax, np.float32(0), -qmax, qmax
  lo = np.minimum(x.min(axes, keepdims=True), np.float32(0))
  hi = np.maximum(x.max(axes, keepdims=True), np.float32(0))
  scale = (hi - lo) / np.float32(2**bits - 1)
  return scale, np.round(-lo / scale), np.float32(0), np.float32(2**bits - 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("channel_axis", [None, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_values_on_grid_and_error_bounded(symmetric, channel_axis, bits):
  x = _x()
  y = np.asarray(fq.fake_quant(x, jnp.float32(bits), symmetric=symmetric,
                               channel_axis=channel_axis))
  x = np.asarray(x)
  scale, zp, qmin, qmax = _grid_np(x, bits, symmetric, channel_axis)
  codes = y / scale + zp
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # on the grid
  codes = np.round(codes)
  assert codes.min() >= qmin and codes.max() <= qmax
  # Round to nearest: the code of every value is the nearest grid point.
  want = (np.clip(np.round(x / scale + zp), qmin, qmax) - zp) * scale
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(y - x) <= scale / 2 * (1 + 1e-5))  # absmax never clips
  # The extremes map to the end codes: the whole range is used.
  reduce = None if channel_axis is None else (0, 1)
  if symmetric:
    np.testing.assert_array_equal(np.abs(codes).max(reduce), qmax)
  else:  # every channel of x has values of both signs
    np.testing.assert_array_equal(codes.min(reduce), qmin)
    np.testing.assert_array_equal(codes.max(reduce), qmax)
  n_levels = 2**bits - (1 if symmetric else 0)
  cols = [np.unique(codes[..., c]) for c in range(x.shape[-1])]
  assert max(len(c) for c in cols) <= n_levels


def test_asymmetric_represents_zero_exactly():
  x = jnp.concatenate([jnp.zeros((1,)), jax.random.uniform(jax.random.key(1), (50,)) + 0.3])
  y = fq.fake_quant(x, jnp.float32(3), symmetric=False)
  assert float(y[0]) == 0.0


def test_per_channel_beats_per_tensor_on_scaled_channels():
  x = _x()
  e_t = jnp.mean((fq.fake_quant(x, 4.0, channel_axis=None) - x) ** 2)
  e_c = jnp.mean((fq.fake_quant(x, 4.0, channel_axis=-1) - x) ** 2)
  assert float(e_c) < float(e_t)


def test_percentile_clips_outliers():
  x = jnp.concatenate([jax.random.normal(jax.random.key(2), (999,)), jnp.array([100.0])])
  y = fq.fake_quant(x, 4.0, method="percentile", percentile=99.0)
  assert float(jnp.max(y)) < 10.0


def test_ste_gradient_is_identity_inside_range():
  x = _x()
  g = jax.grad(lambda x: jnp.sum(fq.fake_quant(x, 3.0, channel_axis=-1)))(x)
  np.testing.assert_allclose(g, 1.0)


def test_learned_range_gets_lsq_gradient():
  x = _x()
  r = jnp.full((x.shape[-1],), 2.0)
  g = jax.grad(lambda r: jnp.sum((fq.fake_quant(x, 3.0, channel_axis=-1, method="learned",
                                                learned_range=r) - x) ** 2))(r)
  assert np.all(np.abs(np.asarray(g)) > 0)


def test_fracbits_interpolates_and_matches_integers():
  x = _x()
  for b in (2.0, 3.0, 5.0):
    np.testing.assert_allclose(fq.fracbits_quant(x, jnp.float32(b)), fq.fake_quant(x, b),
                               atol=1e-6)
  mid = fq.fracbits_quant(x, jnp.float32(3.25))
  q3, q4 = fq.fake_quant(x, 3.0), fq.fake_quant(x, 4.0)
  np.testing.assert_allclose(mid, 0.75 * q3 + 0.25 * q4, atol=1e-6)


@pytest.mark.parametrize("b", [3.0, 3.6, 8.0])
def test_fracbits_bit_gradient_is_quantizer_difference(b):
  """d/db Q(x; b) = Q(x; floor b + 1) - Q(x; floor b), non-zero at integers too."""
  x = _x()
  w = jax.random.normal(jax.random.key(3), x.shape)
  bits = jnp.full((x.shape[-1],), b)
  g = jax.grad(lambda bits: jnp.sum(w * fq.fracbits_quant(x, bits, channel_axis=-1)))(bits)
  lo = np.floor(b)
  want = jnp.sum(w * (fq.fake_quant(x, lo + 1, channel_axis=-1)
                      - fq.fake_quant(x, lo, channel_axis=-1)), axis=(0, 1))
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=2e-5)
  assert np.all(np.abs(np.asarray(g)) > 0)


def test_diffq_noise_is_one_step_and_differentiable_in_bits():
  x = _x()
  bits = jnp.full((x.shape[-1],), 3.3)
  y = fq.noise_quant(x, bits, jax.random.key(4), channel_axis=-1)
  lo, hi = fq.range_stats(x, symmetric=True, channel_axis=-1)
  step = (hi - lo) / (2 * (2.0**2.3 - 1))
  assert float(jnp.max(jnp.abs(y - x) - step / 2)) <= 1e-5
  g = jax.grad(lambda b: jnp.sum(fq.noise_quant(x, b, jax.random.key(4), channel_axis=-1) ** 2))(bits)
  assert np.all(np.abs(np.asarray(g)) > 0)


def test_unknown_scale_method_lists_valid():
  with pytest.raises(ValueError, match="absmax, percentile, learned, mse"):
    fq.fake_quant(_x(), 4.0, method="minmax")


@pytest.mark.parametrize("method", ["absmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_fake_quant_is_idempotent_with_constant_bits(bits, method):
  """Re-quantizing quantized weights changes nothing (export relies on it)."""
  w = jax.random.normal(jax.random.key(bits), (64, 512))
  f = jax.jit(lambda x: fq.fake_quant(x, jnp.float32(bits), symmetric=True, channel_axis=-1,
                                      method=method))
  once = f(w)
  np.testing.assert_array_equal(np.asarray(f(once)), np.asarray(once))


def test_fracbits_error_is_not_monotone_in_the_bit_width():
  """The documented flaw of fracbits: its error is lowest inside each interval, near k + 0.8."""
  w = jax.random.normal(jax.random.key(0), (3, 3, 64, 128))  # a typical conv kernel
  fs = np.linspace(0.0, 1.0, 51)
  for k in range(2, 8):
    err = np.array([float(jnp.mean((fq.fracbits_quant(w, jnp.float32(k + f)) - w) ** 2))
                    for f in fs])
    assert err[40] < err[50], k  # k + 0.8 beats k + 1
    assert 0.6 <= fs[np.argmin(err)] <= 0.95, (k, fs[np.argmin(err)])
    # The rounding quantizer itself is monotone: one more bit, less error.
    assert float(jnp.mean((fq.fake_quant(w, jnp.float32(k + 1)) - w) ** 2)) < \
        float(jnp.mean((fq.fake_quant(w, jnp.float32(k)) - w) ** 2))


def _numpy_mse_quant(w, bits, symmetric):
  """The `mse` scale method per output channel, transcribed in numpy (grid of clip ratios)."""
  qmax = 2.0 ** (bits - 1) - 1 if symmetric else 2.0 ** bits - 1
  qmin = -qmax if symmetric else 0.0
  out = np.empty_like(w)
  for c in range(w.shape[-1]):
    x = w[..., c].astype(np.float64)
    lo, hi = (-np.abs(x).max(), np.abs(x).max()) if symmetric else (min(x.min(), 0), max(x.max(), 0))
    best, best_err = None, np.inf
    for ratio in np.linspace(1.0, 1.0 - fq.MSE_MAX_SHRINK, fq.MSE_GRID):
      l, h = ratio * lo, ratio * hi
      scale = (h / qmax) if symmetric else (h - l) / (qmax - qmin)
      zp = 0.0 if symmetric else np.round(-l / scale)
      q = (np.clip(np.round(x / scale + zp), qmin, qmax) - zp) * scale
      err = np.sum((q - x) ** 2)
      if err < best_err * (1 - 1e-6):  # strictly better: the first (widest) of near-ties
        best, best_err = q, err
    out[..., c] = best
  return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_mse_scale_matches_a_numpy_grid_search_and_never_loses_to_absmax(bits, symmetric):
  w = np.array(jax.random.normal(jax.random.key(bits), (3, 3, 8, 16)))
  w[0, 0, 0, 3] = 9.0  # an outlier: absmax wastes the grid on it
  got = np.asarray(fq.fake_quant(jnp.asarray(w), jnp.float32(bits), symmetric=symmetric,
                                 channel_axis=-1, method="mse"))
  want = _numpy_mse_quant(w, bits, symmetric)
  err_got = ((got - w) ** 2).sum((0, 1, 2))
  err_want = ((want - w) ** 2).sum((0, 1, 2))
  np.testing.assert_allclose(err_got, err_want, rtol=1e-4)
  absmax = np.asarray(fq.fake_quant(jnp.asarray(w), jnp.float32(bits), symmetric=symmetric,
                                    channel_axis=-1))
  assert np.all(err_got <= ((absmax - w) ** 2).sum((0, 1, 2)) * (1 + 1e-6))
  if bits <= 3:  # at 2-3 bits the searched range clearly wins on Gaussian weights
    assert err_got.sum() < 0.8 * ((absmax - w) ** 2).sum()


def test_mse_scale_needs_the_bits():
  with pytest.raises(ValueError, match="needs the bit-widths"):
    fq.range_stats(_x(), symmetric=True, channel_axis=-1, method="mse")


def test_diffq_ste_forward_is_the_deployed_quantizer_and_its_bit_gradient_is_diffqs():
  """Forward: Q(x; round b); d/dx: QAT's straight-through; d/db: DiffQ's noise gradient."""
  from baq.quant import parametrizations  # pylint: disable=import-outside-toplevel
  p = parametrizations.get("diffq_ste")
  assert p.trains_bits and p.needs_rng
  x = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  b = jnp.linspace(2.2, 7.7, 16)
  kw = dict(symmetric=True, channel_axis=-1, method="mse")
  key = jax.random.key(1)
  np.testing.assert_array_equal(np.asarray(p.quantize(x, b, key, **kw)),
                                np.asarray(fq.fake_quant(x, jnp.round(b), **kw)))
  probe = jax.random.normal(jax.random.key(2), x.shape)
  gx = jax.grad(lambda v: jnp.sum(p.quantize(v, b, key, **kw) * probe))(x)
  gx_qat = jax.grad(lambda v: jnp.sum(fq.fake_quant(v, jnp.round(b), **kw) * probe))(x)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_qat))
  gb = jax.grad(lambda c: jnp.sum(p.quantize(x, c, key, **kw) * probe))(b)
  gb_diffq = jax.grad(lambda c: jnp.sum(fq.noise_quant(x, c, key, **kw) * probe))(b)
  np.testing.assert_allclose(np.asarray(gb), np.asarray(gb_diffq), rtol=1e-5)
  assert np.all(np.asarray(gb) != 0)
