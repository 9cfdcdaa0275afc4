"""baq.quant.numerics against numpy transcriptions of bitsandbytes and torch, and hand cases.

Each reference is written here from the published code, step by step, in the
runtime's dtypes (float64 where the C++ computes in double), for bitsandbytes
0.50's CPU path:
  * LLM.int8: backends/default `int8_vectorwise_quant` (outlier columns, row
    absmax, torch's `127.0 / t` as `t.reciprocal() * 127`),
    `int8_linear_matmul`, `int8_mm_dequant`, `int8_mixed_scaled_mm`
    (outliers in the input's dtype, torch.addmm's fused multiply-add chain).
  * NF4/FP4: `quantize_4bit` (blocks over the torch [out, in] weight, the
    last partial block divided), `dequantize_4bit`, `create_dynamic_map`
    and the CPU library's lookup-table `quantize_blockwise` for double
    quantization.
  * dynamic int8: ATen QuantUtils.h `ChooseQuantizationParams`, fbgemm
    `QuantizeAvx2` (LEGACY fma), the observers' symmetric qint8 scale,
    `quantize_val`, and fbgemm's int32 GEMM with `ReQuantizeForFloat`.

A transcription is not a reference: tests/test_numerics_hand.py pins values
that bitsandbytes 0.50.2 and torch 2.13 gave, and `python -m
benchmarks.bnb_torch_check` compares with the libraries themselves.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from baq.quant import inject, numerics
from baq.quant.numerics import _aten

F16, F32 = np.float16, np.float32
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]  # get_4bit_type
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], F32) / F32(12)


def _data(m=24, d_in=160, d_out=48, outlier_cols=(3, 77, 140), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, d_in)).astype(F32)
  x[:, list(outlier_cols)] *= 15.0  # LLM.int8's systematic outlier features
  w = (rng.standard_normal((d_in, d_out)) * 0.05).astype(F32)
  return x, w


# ------------------------------------------------------------ bitsandbytes
def _bnb_vectorwise_quant(A, threshold=0.0):
  """backends/default int8_vectorwise_quant (A float16 [rows, cols])."""
  A = A.copy()
  outlier_cols = None
  if threshold > 0.0:
    outliers = np.abs(A) >= F16(threshold)
    if outliers.any():
      outlier_cols = np.flatnonzero(outliers.any(axis=0))
      A[outliers] = 0
  row_stats = np.abs(A).max(axis=1).astype(F32)
  scale = (F32(1.0) / row_stats[:, None]) * F32(127.0)  # torch: 127.0 / t is t.reciprocal() * 127
  out_row = np.round(A.astype(F32) * scale).astype(np.int8)
  if A.shape[0] > 1 and outlier_cols is not None:
    out_row[:, outlier_cols] = 0
  return out_row, row_stats, outlier_cols


def _fma(a, b, c):
  """fl32(a * b + c), one rounding (the float32 product is exact in float64)."""
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(F32)


def _bnb_matmul8bitlt(x, w, threshold, outlier_weights="int8"):
  """MatMul8bitLt.forward with Int8Params weights (B is the torch weight w.T), CPU path."""
  A, B = x.astype(F16), w.T.astype(F16)
  CA, SCA, cols = _bnb_vectorwise_quant(A, threshold)
  CB, SCB, _ = _bnb_vectorwise_quant(B)
  acc = (CA.astype(np.int64) @ CB.astype(np.int64).T).astype(np.int32)  # int8_linear_matmul
  if outlier_weights == "float16":  # bitsandbytes <= 0.44: fp16 throughout
    out = ((acc.astype(F32) * (SCA[:, None] * SCB[None, :])) * F32(6.200124e-05)).astype(F16)
    if threshold > 0.0 and cols is not None:
      out = (out.astype(F32) + A[:, cols].astype(F32) @ B[:, cols].T.astype(F32)).astype(F16)
    return out
  # int8_mm_dequant: A * (row * col) * 6.200124e-05, in float32, then to x's dtype.
  out = ((acc.astype(F32) * (SCA[:, None] * SCB[None, :])) * F32(6.200124e-05)).astype(x.dtype)
  if threshold > 0.0 and cols is not None:
    # int8_vectorwise_dequant(CB[:, cols], SCB).to(A.dtype).t(); output.addmm(subA, subB)
    sub_b = ((CB[:, cols].astype(F32) * SCB[:, None]) * F32(7.874015718698502e-3)).astype(x.dtype).T
    chain = np.zeros(out.shape, F32)
    for k in range(len(cols)):  # MKL sgemm: a fused multiply-add per column, from 0
      chain = _fma(x[:, cols[k]].astype(F32)[:, None], sub_b[k].astype(F32)[None, :], chain)
    out = (out.astype(F32) + chain).astype(x.dtype)
  return out


def _bucketize(table):
  """torch.bucketize over the sorted table's float32 midpoints (backends/default)."""
  code = np.sort(table)
  bounds = ((code[:-1] + code[1:]) / F32(2)).astype(F32)
  return lambda v: code[np.searchsorted(bounds, v, side="left")]


def _bnb_4bit_values(A, blocksize, table):
  """quantize_4bit: (the code's value per weight, absmax per block); full blocks
  are scaled by x * (1 / absmax), the partial last block by x / absmax (its
  absmax clamped to 1e-38)."""
  flat, nearest = A.reshape(-1).astype(F32), _bucketize(table)
  full = flat.size - flat.size % blocksize
  out, absmax = [], []
  for start in range(0, flat.size, blocksize):
    block = flat[start:start + blocksize]
    am = np.abs(block).max()
    if start < full:
      scaled = block * (F32(1.0) / max(am, F32(1e-38)))
    else:
      am = max(am, F32(1e-38))
      scaled = block / am
    absmax.append(am)
    out.append(nearest(np.clip(scaled, -1, 1)))
  return np.concatenate(out), np.array(absmax, F32)


def _torch_linspace(start, end, steps):
  """torch.linspace in float32, vectorised RangeFactoriesKernel: two halves from either
  end, each element start + step * i (or end - step * j) rounded once."""
  start, end = F32(start), F32(end)
  step = np.float64((end - start) / F32(steps - 1))
  return np.array([np.float64(start) + step * i if i < steps // 2
                   else np.float64(end) - step * (steps - i - 1) for i in range(steps)]).astype(F32)


def _create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
  """functional.create_dynamic_map."""
  data = []
  non_sign_bits = total_bits - 1
  for i in range(max_exponent_bits):
    fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                         else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
    boundaries = _torch_linspace(0.1, 1, fraction_items)
    means = (boundaries[:-1] + boundaries[1:]) / F32(2.0)
    data += (F32(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if signed:
      data += (-F32(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
  data += [0, 1.0]
  return np.array(sorted(data), F32)


def _cpu_quantize_blockwise(A, code, blocksize=256):
  """csrc/cpu_ops.cpp quantize_cpu_impl: codes from a 65,536-bin table of the code map."""
  mid = (F32(0.5) * (code[:-1] + code[1:])).astype(F32)
  bins = (F32(-1) + (F32(2) * np.arange(65536, dtype=F32)) / F32(65535)).astype(F32)
  lut = (mid[None, :] < bins[:, None]).sum(axis=1)  # the first midpoint not below the bin
  out, absmax = [], []
  for start in range(0, A.size, blocksize):
    block = A[start:start + blocksize]
    am = np.abs(block).max(initial=F32(0))
    absmax.append(am)
    if am == 0:
      out.append(np.zeros(block.size, np.int64))
      continue
    v = np.clip(block * (F32(1) / am), -1, 1)
    out.append(lut[((v + F32(1)) * F32(0.5) * F32(65535) + F32(0.5)).astype(np.int64)])
  return np.concatenate(out), np.array(absmax, F32)


def _bnb_4bit_weight(w, quant_type, blocksize, double_quant):
  """Params4bit(w.T) then dequantize_4bit, in the kernel's layout."""
  table = np.array(NF4, F32) if quant_type == "nf4" else FP4
  values, absmax = _bnb_4bit_values(w.T, blocksize, table)
  if double_quant:  # compress_statistics: quantize_blockwise(absmax - offset, blocksize=256)
    code = _create_dynamic_map()
    offset = np.asarray(_aten.cascade_sum(jnp.asarray(absmax))) / F32(absmax.size)  # .mean()
    codes2, absmax2 = _cpu_quantize_blockwise((absmax - offset).astype(F32), code)
    deq = (code[codes2] * np.repeat(absmax2, 256)[:codes2.size]).astype(F32)
    absmax = (deq + offset).astype(F32)
  return (values * np.repeat(absmax, blocksize)[:values.size]).reshape(
      w.shape[1], w.shape[0]).T


# ---------------------------------------------------------------- torch
def _choose_qparams(mn, mx, qmin=0, qmax=255, reduce_range=False):
  """ATen quantized/cpu/QuantUtils.h ChooseQuantizationParams (preserve_sparsity=False)."""
  if reduce_range:
    qmin, qmax = qmin // 2, qmax // 2
  mn, mx = min(F32(mn), F32(0)), max(F32(mx), F32(0))
  scale = (np.float64(mx) - np.float64(mn)) / (qmax - qmin)
  if F32(scale) == 0 or np.isinf(F32(1) / F32(scale)):
    scale = 0.1
  small = F32(6.1e-5)
  if scale < small:
    org, scale = scale, np.float64(small)
    if mn == 0:
      mx = small * F32(qmax - qmin)
    elif mx == 0:
      mn = -small * F32(qmax - qmin)
    else:
      amp = F32(small / F32(org))
      mn, mx = mn * amp, mx * amp
  zp_min, zp_max = qmin - mn / scale, qmax - mx / scale
  err_min, err_max = abs(qmin) - abs(mn / scale), abs(qmax) - abs(mx / scale)
  zp = zp_min if err_min < err_max else zp_max
  return F32(scale), int(qmin if zp < qmin else qmax if zp > qmax else np.rint(zp))


def _torch_dynamic_linear(x, w, reduce_range=True, per_channel=False):
  """dynamic.Linear: observer + quantize_per_tensor/channel, then fbgemm linear_dynamic."""
  W = w.T  # [out, in]
  axis = 1 if per_channel else None
  min_neg = np.minimum(W.min(axis=axis, keepdims=True), F32(0))
  max_pos = np.maximum(W.max(axis=axis, keepdims=True), F32(0))
  w_scale = np.maximum(np.maximum(-min_neg, max_pos) / F32(127.5), F32(np.finfo(F32).eps))
  qw = np.clip(np.rint(W * (F32(1.0) / w_scale)), -128, 127).astype(np.int64)
  scale, zp = _choose_qparams(x.min(), x.max(), reduce_range=reduce_range)
  inv = F32(1.0) / scale  # QuantizeAvx2<uint8_t, LEGACY>: cvtps(fmadd(x, inv, zp))
  qa = np.clip(np.rint(F32(x.astype(np.float64) * np.float64(inv) + zp)), 0, 255).astype(np.int64)
  raw = (qa @ qw.T - zp * qw.sum(axis=1)[None, :]).astype(np.int32)
  return raw.astype(F32) * (scale * w_scale.reshape(1, -1)).astype(F32)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_llm_int8_matches_bitsandbytes(threshold, dtype):
  x, w = _data()
  x = x.astype(dtype)
  dot = functools.partial(numerics.NUMERICS.get("llm_int8").dot, threshold=threshold)
  got = np.asarray(jax.jit(dot)(jnp.asarray(x), jnp.asarray(w)))
  ref = _bnb_matmul8bitlt(x, w, threshold)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(np.asarray(dot(jnp.asarray(x), jnp.asarray(w))), ref)


def test_llm_int8_huge_threshold_is_pure_vectorwise_int8():
  x, w = _data()
  dot = numerics.NUMERICS.get("llm_int8").dot
  got = np.asarray(dot(jnp.asarray(x), jnp.asarray(w), threshold=1e9))
  np.testing.assert_array_equal(got, np.asarray(dot(jnp.asarray(x), jnp.asarray(w), threshold=0.0)))
  np.testing.assert_array_equal(got, _bnb_matmul8bitlt(x, w, 0.0).astype(F32))


def test_llm_int8_outlier_columns_are_computed_in_fp16():
  x, w = _data()
  cols = [3, 77, 140]
  w_out = np.zeros_like(w)
  w_out[cols] = w[cols]  # the product is the outlier columns' alone
  exact = x.astype(np.float64) @ w_out.astype(np.float64)
  dot = functools.partial(numerics.NUMERICS.get("llm_int8").dot, x=jnp.asarray(x))
  err = lambda y: np.abs(np.asarray(y) - exact).max() / np.abs(exact).max()
  fp16 = err(dot(w=jnp.asarray(w_out), outlier_weights="float16"))
  assert fp16 < 2e-3  # fp16 rounding of inputs and output only
  assert err(dot(w=jnp.asarray(w_out), threshold=0.0)) > 3 * fp16  # int8 with outliers in the absmax
  ref = _bnb_matmul8bitlt(x, w_out, 6.0, "float16").astype(F32)
  np.testing.assert_allclose(np.asarray(dot(w=jnp.asarray(w_out), outlier_weights="float16")),
                             ref, rtol=2**-10, atol=1e-6)


def test_llm_int8_weight_only_is_per_channel_absmax_int8():
  _, w = _data()
  got = np.asarray(numerics.NUMERICS.get("llm_int8").quantize_weight(jnp.asarray(w)))
  CB, SCB, _ = _bnb_vectorwise_quant(w.T.astype(F16))
  deq = (CB.astype(F32) * SCB[:, None]) * F32(7.874015718698502e-3)  # int8_vectorwise_dequant
  np.testing.assert_array_equal(got, deq.T)
  assert (np.abs(got - w) <= np.abs(w).max(axis=0) / 254 + 1e-4).all()  # half a step (+ fp16)


def test_nf4_table_is_bitsandbytes():
  np.testing.assert_array_equal(numerics.NF4_CODE, np.array(NF4, F32))
  offset = 0.9677083  # create_normal_map(offset, use_extra_value=True)
  v = (norm.ppf(_torch_linspace(offset, 0.5, 9)[:-1]).tolist() + [0] * 241
       + (-norm.ppf(_torch_linspace(offset, 0.5, 8)[:-1])).tolist())
  values = np.sort(np.array(v, F32))
  values /= values.max()
  np.testing.assert_allclose(values[values != 0], np.delete(numerics.NF4_CODE, 7), atol=1e-7)
  np.testing.assert_array_equal(numerics.DYNAMIC_CODE, _create_dynamic_map())


@pytest.mark.parametrize("quant_type,blocksize,double_quant,shape", [
    ("nf4", 64, False, (96, 40)), ("nf4", 64, True, (97, 300)),
    ("nf4", 128, False, (33, 50)), ("fp4", 64, False, (96, 40)), ("fp4", 256, True, (64, 70))])
def test_4bit_weight_matches_bitsandbytes(quant_type, blocksize, double_quant, shape):
  rng = np.random.default_rng(1)
  w = (rng.standard_normal(shape) * 0.02).astype(F32)
  w[rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5)] = 0.4  # outliers set block scales
  got = np.asarray(numerics.NUMERICS.get(quant_type).quantize_weight(
      jnp.asarray(w), blocksize=blocksize, double_quant=double_quant))
  np.testing.assert_array_equal(got, _bnb_4bit_weight(w, quant_type, blocksize, double_quant))


def test_nf4_blocks_are_torch_rows():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((64, 3)).astype(F32)  # three output channels: three 64-blocks
  q = numerics.NUMERICS.get("nf4").quantize_weight
  scaled = w.copy()
  scaled[:, 1] *= 1000.0
  np.testing.assert_array_equal(np.asarray(q(jnp.asarray(scaled)))[:, [0, 2]],
                                np.asarray(q(jnp.asarray(w)))[:, [0, 2]])
  assert set(np.unique(np.asarray(q(jnp.asarray(w)))[:, 0] / np.abs(w[:, 0]).max())) <= set(
      np.array(NF4, F32).tolist())


@pytest.mark.parametrize("compute_dtype,rtol", [("float32", 1e-6), ("bfloat16", 2**-8),
                                                (jnp.float16, 2**-11)])
def test_nf4_dot_in_compute_dtype(compute_dtype, rtol):
  x, w = _data()
  nf4 = numerics.NUMERICS.get("nf4")
  got = np.asarray(nf4.dot(jnp.asarray(x), jnp.asarray(w), compute_dtype=compute_dtype))
  wq = np.asarray(nf4.quantize_weight(jnp.asarray(w)), np.float64)
  dt = jnp.dtype(compute_dtype)
  ref = np.asarray(jnp.asarray(x).astype(dt), np.float64) @ np.asarray(jnp.asarray(wq).astype(dt),
                                                                         np.float64)
  np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
  assert got.dtype == np.float32


@pytest.mark.parametrize("kind", ["mixed", "relu", "negative", "tiny", "zero"])
@pytest.mark.parametrize("reduce_range,per_channel", [(True, False), (True, True)])
def test_dynamic_int8_matches_torch(kind, reduce_range, per_channel):
  x, w = _data(outlier_cols=(5,))
  x = {"mixed": x, "relu": np.maximum(x, 0), "negative": -np.abs(x), "tiny": x * F32(1e-4),
       "zero": np.zeros_like(x)}[kind]
  got = np.asarray(numerics.NUMERICS.get("dynamic_int8").dot(
      jnp.asarray(x), jnp.asarray(w), reduce_range=reduce_range, per_channel=per_channel))
  np.testing.assert_array_equal(got, _torch_dynamic_linear(x, w, reduce_range, per_channel))


def test_dynamic_int8_error_shrinks_with_the_activation_range():
  x, w = _data(outlier_cols=())
  x = np.clip(x, -2, 2)
  dot = functools.partial(numerics.NUMERICS.get("dynamic_int8").dot, per_channel=True)
  errors = []
  for r in (64.0, 16.0, 4.0):
    xr = x.copy()
    xr[0, 0] = r  # the range [-2, r] sets the activation step
    exact = xr.astype(np.float64) @ w
    errors.append(np.linalg.norm(np.asarray(dot(jnp.asarray(xr), jnp.asarray(w))) - exact)
                  / np.linalg.norm(exact))
  assert errors[0] > 2 * errors[1] > 4 * errors[2]


def test_jit_matches_eager_and_ste_gives_the_float_gradient():
  x, w = (jnp.asarray(a) for a in _data(m=6))
  for name in numerics.NUMERICS.names():
    numeric = numerics.NUMERICS.get(name)
    dot = numeric.dot
    # Integer paths are bit-equal; XLA may sum a float32 matmul in another order.
    np.testing.assert_allclose(np.asarray(jax.jit(dot)(x, w)), np.asarray(dot(x, w)),
                               rtol=1e-5 if numeric.weight_only else 0, atol=1e-6 * numeric.weight_only)
    assert np.isfinite(np.asarray(jax.grad(lambda x: dot(x, w).sum())(x))).all()
    g = jax.grad(lambda x, w: dot(x, w, ste=True).sum(), argnums=(0, 1))(x, w)
    ones = np.ones((6, 48))  # d(sum x @ w): exactly the float matmul's gradient
    np.testing.assert_allclose(g[0], ones @ np.asarray(w, np.float64).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[1], np.asarray(x, np.float64).T @ ones, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(dot(x, w, ste=True)), np.asarray(dot(x, w)))


def test_injected_dense_runs_the_numeric():
  x, w = (jnp.asarray(a) for a in _data(m=4))
  spec = inject.QuantSpec(numerics="llm_int8", numerics_options=(("threshold", 5.0),))
  model = inject.Dense(inject.Quantizer(rules=((".*", spec),)))(48, use_bias=False)
  y = model.apply({"params": {"kernel": w}}, x)
  np.testing.assert_array_equal(y, numerics.NUMERICS.get("llm_int8").dot(x, w, threshold=5.0))
  assert isinstance(model, nn.Dense)


def test_bad_options_and_names_raise():
  x, w = (jnp.asarray(a) for a in _data(m=2))
  get = numerics.NUMERICS.get
  for call, match in [
      (lambda: get("llm_int8").dot(x, w, threshold=-1.0), "threshold must be >= 0"),
      (lambda: get("llm_int8").dot(x, w, outlier_weights="fp8"), "outlier_weights"),
      (lambda: get("nf4").dot(x, w, blocksize=48), r"blocksize.*\[32, 4096\]"),
      (lambda: get("nf4").quantize_weight(w, blocksize=8192), "blocksize"),
      (lambda: get("fp4").dot(x, w, compute_dtype="float8"), "compute_dtype"),
      (lambda: get("nf4").dot(x, w, compute_dtype=jnp.int8), "compute_dtype"),
      (lambda: get("dynamic_int8").quantize_weight(w[None]), "Dense kernel"),
      (lambda: get("dynamic_int8").dot(x, w, reduce_range=False), "reduce_range must be True")]:
    with pytest.raises(ValueError, match=match):
      call()
  with pytest.raises(KeyError, match="dynamic_int8, fp4, llm_int8, nf4"):
    get("nf5")
  assert get("nf4").weight_only and not get("llm_int8").weight_only
  assert get("nf4").quantize_weight(w, blocksize=32).shape == w.shape
