"""Hand cases of baq.quant.numerics, pinned from bitsandbytes 0.50.2 and torch 2.13.

Each value here came from the real libraries on an AVX-512 CPU (the check
script `python -m benchmarks.bnb_torch_check` compares the whole set there),
chosen where an earlier reading of their code gave another answer: these
would have caught those readings without torch in the suite.
"""

import jax
import jax.numpy as jnp
import numpy as np

from baq.quant import numerics
from baq.quant.numerics import _aten, four_bit, llm_int8

F16, F32 = np.float16, np.float32
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], F32) / F32(12)


def _cuda_fp4(x):
  """csrc/kernels.cu dQuantizeFP4 (bit-pattern codes): the GPU's truncated boundaries."""
  sign = 0b1000 if x < 0 else 0
  x = abs(x)
  if x > 0.29166667:
    if x > 0.583333:
      return (0b0011 if x > 0.8333333 else 0b0010) + sign
    return (0b101 if x > 0.4166667 else 0b100) + sign
  if x > 0.0859375:
    return (0b0111 if x > 0.20833333 else 0b0110) + sign
  return (0b0001 if x > 0.00260417 else 0b0000) + sign


def test_hand_llm_int8_tie_rounds_as_reciprocal_times_127():
  """absmax 1.01171875, value 0.505859375: 0.505859375 * 127 / 1.01171875 is
  exactly 63.5 (true division: code 64), but torch's 127.0 / absmax is
  absmax.reciprocal() * 127, and 0.505859375 times that is 63.499996: code 63,
  as bitsandbytes 0.50.2 gives."""
  a = np.array([[1.01171875, 0.505859375]], F32)
  assert F32(0.505859375) * (F32(127) / F32(1.01171875)) == F32(63.5)
  codes, stats = llm_int8._vectorwise(jnp.asarray(a), 1)
  np.testing.assert_array_equal(np.asarray(codes), [[127, 63]])
  y = np.asarray(numerics.NUMERICS.get("llm_int8").dot(jnp.asarray(a), jnp.eye(2)))
  # int8_mm_dequant of 63 * 127 with row 1.01171875, column 1: not 64's value.
  assert y[0, 1] == F32(F32(F32(63 * 127) * F32(1.01171875)) * F32(6.200124e-05))


def test_hand_llm_int8_float32_outliers_stay_float32():
  """x = [7.3, 0.5] (7.3 an outlier), w = [0.375, 0.5]: the int8 part is
  127 * 127 * (0.5 * 0.5) * 6.200124e-05 in float32, the outlier part 7.3 times
  the dequantized weight round(0.375 * 254) * 0.5 / 127, added in float32 and
  never rounded to float16 (the earlier reading rounded both to fp16)."""
  x = np.array([[7.3, 0.5]], F32)
  w = np.array([[0.375], [0.5]], F32)
  int8_part = F32(F32(F32(127 * 127) * F32(F32(0.5) * F32(0.5))) * F32(6.200124e-05))
  sub_b = F32(F32(F32(95) * F32(0.5)) * F32(7.874015718698502e-3))
  want = F32(int8_part + F32(F32(7.3) * sub_b))
  y = np.asarray(numerics.NUMERICS.get("llm_int8").dot(jnp.asarray(x), jnp.asarray(w)))
  assert y.dtype == F32 and y[0, 0] == want
  assert F32(F16(want)) != want  # a float16 rounding would have shown


def test_hand_dynamic_map_entries_are_the_vectorised_linspace():
  """create_dynamic_map() of bitsandbytes 0.50.2 on torch 2.13 (AVX2 and AVX-512
  alike): entries 231, 234, 236 (of 42 that differ from rounding the product
  first, as a scalar build of torch does)."""
  for i, bnb, scalar in [(231, 0.6695312261581421, 0.6695312857627869),
                         (234, 0.7117187976837158, 0.711718738079071),
                         (236, 0.7398437261581421, 0.7398437857627869)]:
    assert numerics.DYNAMIC_CODE[i] == F32(bnb) != F32(scalar)
  assert numerics.DYNAMIC_CODE.size == 256 and (np.diff(numerics.DYNAMIC_CODE) > 0).all()


def test_hand_double_quant_codes_come_from_the_cpu_lookup_table():
  """quantize_blockwise([1, 0.9964841]) on the CPU gives codes [255, 255]: the
  nearest code of 0.9964841 is 254 (0.99296874; the midpoint is 0.99648437), but
  its table bin, -1 + 2 * 65420 / 65535 = 0.99649, lies above the midpoint."""
  codes, absmax = four_bit._dynamic_blockwise(jnp.asarray([1.0, 0.996484100818634], jnp.float32))
  np.testing.assert_array_equal(np.asarray(codes), [255, 255])
  assert numerics.DYNAMIC_CODE[254] < 0.996484100818634 < (numerics.DYNAMIC_CODE[254] + 1) / 2
  assert float(absmax[0]) == 1.0


def test_hand_partial_block_is_divided():
  """The last partial block is x / absmax: -0.2554887 / 0.75214654 is NF4's
  midpoint -0.33967942 (code 3, -0.39491749), while x * (1 / absmax) lies just
  above it (code 4). bitsandbytes 0.50.2 dequantizes it to -0.2970358."""
  w = np.zeros((66, 1), F32)  # one output channel: a block of 64 and a partial one of 2
  w[:64], w[64], w[65] = 0.01, 0.75214654, -0.2554887
  got = np.asarray(jax.jit(numerics.NUMERICS.get("nf4").quantize_weight)(jnp.asarray(w)))
  assert got[65, 0] == F32(-0.39491748809814453) * F32(0.75214654) == F32(-0.2970358)
  assert got[64, 0] == F32(0.75214654)


def test_hand_torch_sum_order():
  """torch 2.13's float32 sum: [2^-24, 1, 2^-24, 2^-24, 2^-24] is 1 + 2^-22 (four
  interleaved accumulators), and 1, fifteen 2^-24 and four 2^-23 is 1 + 22 * 2^-24
  (eight vector lanes), where a running sum gives 1 and 1 + 8 * 2^-24."""
  e = 2.0**-24
  for v, want in [([e, 1, e, e, e], 1 + 4 * e), ([1] + [e] * 15 + [2 * e] * 4, 1 + 22 * e)]:
    v = jnp.asarray(v, jnp.float32)
    assert float(_aten.cascade_sum(v)) == want == float(jax.jit(_aten.cascade_sum)(v))
  x = np.random.default_rng(0).uniform(0, 1, 5000).astype(F32)
  np.testing.assert_allclose(float(_aten.cascade_sum(jnp.asarray(x))), x.sum(dtype=np.float64),
                             rtol=1e-6)


def test_hand_fp4_follows_the_cpu_midpoints_not_the_cuda_constants():
  """0.58333325 lies between dQuantizeFP4's 0.583333 and the float32 midpoint
  0.5833333 of codes 0.5 and 0.6666667: a GPU gives 0.6666667, the CPU path
  (and baq) 0.5."""
  w = np.array([[1.0], [0.58333325]] + [[0.0]] * 62, F32)
  got = np.asarray(numerics.NUMERICS.get("fp4").quantize_weight(jnp.asarray(w)))
  assert got[1, 0] == F32(0.5)
  assert FP4[_cuda_fp4(F32(0.58333325))] == F32(8 / 12)
