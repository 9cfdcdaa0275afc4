"""llama.cpp's GGUF formats as baq numerics, against the gguf package (gguf.quants).

  * Legacy types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0): bytes identical to
    gguf.quants.quantize and values to gguf.quants.dequantize, on data with
    zeros, ties, outliers (but for the sign of a -0.0 block's scale, where
    baq follows ggml); rows that do not divide into 32 refused.
  * k-quants (Q6_K .. Q2_K; gguf has no quantizer for them): baq's bytes
    decode through gguf.quants.dequantize to exactly baq's dequantization,
    and the codes have the reference's properties (nearest on the stored
    grid, on-grid data kept exactly, zero blocks, an outlier's block alone).
  * The numerics: the jax path equals the numpy codec; names, storage bits
    and llama.cpp's fallback; `baq.quant.inject` on a Dense layer.
benchmarks/ggml_check.py compares the bytes with llama.cpp's own quantizer.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # pylint: disable=wrong-import-position

from baq.quant import inject, methods  # pylint: disable=wrong-import-position
from baq.quant.numerics import NUMERICS, ggml  # pylint: disable=wrong-import-position

LEGACY = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
KQUANTS = ["q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]
BITS = {"q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5, "q6_k": 6.5625,
        "q5_k": 5.5, "q4_k": 4.5, "q3_k": 3.4375, "q2_k": 2.625}


def _gguf(name):
  return getattr(GGMLQuantizationType, name.upper())


def _rows(k=512, seed=0):
  """Gaussian rows with the cases that break codecs, each in blocks of its own."""
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal((12, k)).astype(np.float32)
  rows[0] = 0.0  # all-zero blocks
  rows[1, :256] = -0.0
  rows[2, 7] = 1e4  # one huge outlier
  rows[3] = np.round(rows[3] * 4) / 4  # many equal values, halves: ties
  rows[4, :32] = np.float32(0.5) * np.arange(-16, 16)  # Q4_0/Q5_0 steps hit exactly
  rows[5] = np.abs(rows[5])  # positive blocks: the affine types' minimum is > 0
  rows[6] = -np.abs(rows[6]) * 1e-6  # tiny, negative
  rows[7, :32] = 3.0  # a constant block
  rows[8] *= 1e3
  return rows


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_are_gguf_quants(name):
  rows = _rows()
  ours = ggml.quantize(rows, name)
  ref = gguf.quants.quantize(rows, _gguf(name))
  assert ours.dtype == np.uint8 and ours.shape == ref.shape
  if name in ("q4_0", "q5_0"):
    # Blocks of -0.0: ggml's d = +0.0 / -8 = -0.0 (its max starts at +0.0 and stays),
    # gguf.quants' -0.0 / -8 = +0.0. baq follows ggml (benchmarks/ggml_check.py).
    size = ggml.TYPES[name].type_size
    np.testing.assert_array_equal(ours[1, :8 * size].reshape(8, size)[:, :2], [[0, 0x80]] * 8)
    np.testing.assert_array_equal(ref[1, :8 * size].reshape(8, size)[:, :2], [[0, 0]] * 8)
    ref = ref.copy()
    ref[1, :8 * size] = ours[1, :8 * size]
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(ggml.dequantize(ours, name), gguf.quants.dequantize(ref, _gguf(name)))
  # ties: x / d + 0.5 exactly an integer, truncated in C and in gguf alike
  ties = (np.float32(0.25) * np.arange(-64, 64, dtype=np.float32)).reshape(4, 32)
  np.testing.assert_array_equal(ggml.quantize(ties, name), gguf.quants.quantize(ties, _gguf(name)))


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_partial_rows_are_refused_like_gguf(name):
  rows = np.ones((2, 172), np.float32)  # stories260K's ffn_down rows
  with pytest.raises(ValueError, match="multiple of"):
    ggml.quantize(rows, name)
  if name in LEGACY:
    with pytest.raises(gguf.quants.QuantError, match="Can't quantize"):
      gguf.quants.quantize(rows, _gguf(name))


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_bytes_decode_through_gguf_to_ours(name):
  rows = _rows(768)
  data = ggml.quantize(rows, name)
  assert data.shape == (12, 3 * ggml.TYPES[name].type_size)
  ours = ggml.dequantize(data, name)
  np.testing.assert_array_equal(ours, gguf.quants.dequantize(data, _gguf(name)))
  assert np.isfinite(ours).all()
  assert not ours[0].any() and not ours[1, :256].any()  # zero blocks stay zero
  # Error against the rest: at most that of a 2^bits-level grid per 256 weights.
  t = ggml.TYPES[name]
  x = rows[9:].reshape(-1, 256)
  err = np.abs(ours[9:].reshape(-1, 256) - x).max(axis=1)
  assert (err <= 1.1 * (x.max(1) - x.min(1)) / 2 ** t.code_bits).all()


def _grid(name, f):
  """Each group's (step, lowest, highest value) on the stored grid, [N, groups]."""
  d = f["d"].astype(np.float32)[:, None]
  if name in ("q6_k", "q3_k"):
    step = d * (f["sc"] - (32 if name == "q3_k" else 0)).astype(np.float32)
    lo, hi = (-32, 31) if name == "q6_k" else (-4, 3)
    return step, np.minimum(step * lo, step * hi), np.maximum(step * lo, step * hi)
  sc, m = (f["sc"] & 0xF, f["sc"] >> 4) if name == "q2_k" else (f["sc"], f["m"])
  step = d * sc.astype(np.float32)
  low = -f["dmin"].astype(np.float32)[:, None] * m.astype(np.float32)
  return step, low, low + step * (3 if name == "q2_k" else 2 ** ggml.TYPES[name].code_bits - 1)


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_codes_are_nearest_on_the_stored_grid(name):
  rows = _rows(512, seed=1)[8:]
  fields = ggml.TYPES[name].unpack(ggml.quantize(rows, name).reshape(-1, ggml.TYPES[name].type_size))
  step, lo, hi = _grid(name, fields)
  group = 256 // step.shape[1]
  x = rows.reshape(-1, step.shape[1], group)
  deq = ggml.dequantize(ggml.quantize(rows, name), name).reshape(x.shape)
  clipped = np.clip(x, lo[..., None], hi[..., None])
  assert (np.abs(deq - clipped) <= np.abs(step)[..., None] * 0.5001 + 1e-6).all()


# (step, minimum) per group that the fp16 and 4/6-bit scales represent exactly
ON_GRID = {"q8_0": (2.0**-7, None), "q5_1": (2.0**-6, -2.0**-2), "q5_0": (2.0**-6, None),
           "q4_1": (2.0**-6, -2.0**-3), "q4_0": (2.0**-6, None), "q6_k": (2.0**-5, None),
           "q3_k": (2.0**-4, None), "q5_k": (63 * 2.0**-10, -63 * 2.0**-9),
           "q4_k": (63 * 2.0**-10, -63 * 2.0**-9), "q2_k": (15 * 2.0**-8, -15 * 2.0**-7)}


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_on_grid_data_round_trips_exactly(name):
  t = ggml.TYPES[name]
  step, low = ON_GRID[name]
  levels = 2 ** (2 if name == "q2_k" else t.code_bits)
  group = 32 if t.block == 32 else (32 if name in ("q5_k", "q4_k") else 16)
  rng = np.random.default_rng(2)
  q = np.stack([rng.permutation(np.arange(group) % levels) for _ in range(4 * 256 // group)])
  if low is None:  # symmetric: codes -levels/2 .. levels/2 - 1, the lowest one present
    q[:, 0] = 0
    x = step * (q - levels // 2)
    if name == "q8_0":  # codes -127 .. 127
      x = step * np.maximum(q - 128, -127)
  else:
    q[:, :2] = [0, levels - 1]
    x = low + step * q
  rows = x.astype(np.float32).reshape(4, 256)
  np.testing.assert_array_equal(ggml.dequantize(ggml.quantize(rows, name), name), rows)


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_an_outlier_moves_its_own_block_only(name):
  rows = _rows(512, seed=3)[9:10]
  hit = rows.copy()
  hit[0, 3] = 1e4
  a, b = ggml.quantize(rows, name), ggml.quantize(hit, name)
  size = ggml.TYPES[name].type_size
  np.testing.assert_array_equal(a[:, size:], b[:, size:])  # the other blocks' bytes
  got = ggml.dequantize(b, name)[0, 3]
  assert abs(got - 1e4) <= 1e4 * 2.0 ** (1 - ggml.TYPES[name].code_bits)


def test_jax_path_is_the_numpy_codec():
  rows = _rows(256, seed=4)[[0, 2, 3, 5, 7, 8, 9]]
  for name in LEGACY + KQUANTS:
    got = np.asarray(NUMERICS.get(name).quantize_weight(jnp.asarray(rows.T))).T
    np.testing.assert_array_equal(got, ggml.dequantize(ggml.quantize(rows, name), name),
                                  err_msg=name)


def test_fallback_follows_llama_cpp():
  assert ggml.stored_type("q4_k", 4096) == "q4_k"
  assert [ggml.stored_type(t, 96) for t in KQUANTS] == ["q8_0", "q5_1", "q5_0", "q4_0", "q4_0"]
  assert [ggml.stored_type(t, 172) for t in LEGACY + KQUANTS] == ["f16"] * 10
  assert ggml.stored_type("q8_0", 96) == "q8_0"
  rng = np.random.default_rng(5)
  w = rng.standard_normal((172, 8)).astype(np.float32)  # [d_in, d_out], rows of 172
  got = np.asarray(NUMERICS.get("q4_k").quantize_weight(jnp.asarray(w)))
  np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
  w96 = rng.standard_normal((96, 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(NUMERICS.get("q4_k").quantize_weight(jnp.asarray(w96))),
                                ggml.dequantize(ggml.quantize(w96.T, "q5_0"), "q5_0").T)
  with pytest.raises(ValueError, match="qtype='q4_2' is not one of q8_0"):
    ggml.stored_type("q4_2", 32)


def test_names_and_storage_bits():
  assert set(LEGACY + KQUANTS) <= set(methods.of_kind("numerics"))
  for name, bits in BITS.items():
    numeric = NUMERICS.get(name)
    assert numeric.weight_only and numeric.options() == {}
    assert ggml.bits_per_weight(name) == bits
    code, scales = numeric.storage(4096, 1024)
    assert code == methods.nominal_bits(name) == ggml.TYPES[name].code_bits
    assert code + scales / (4096 * 1024) == bits
    assert numeric.storage(172, 8) == (16.0, 0.0)  # F16
  code, scales = NUMERICS.get("q6_k").storage(96, 10)  # q8_0 rows
  assert code + scales / 960 == 8.5


def test_injected_dense_is_x_at_dequantized_w():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
  w = rng.standard_normal((256, 16)).astype(np.float32) * 0.05
  spec = inject.QuantSpec(numerics="q4_k")
  model = inject.Dense(inject.Quantizer(rules=((".*", spec),)))(16, use_bias=False)
  y = model.apply({"params": {"kernel": jnp.asarray(w)}}, x)
  wq = ggml.dequantize(ggml.quantize(w.T, "q4_k"), "q4_k").T
  np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ wq, rtol=1e-5, atol=1e-5)
  assert isinstance(model, nn.Dense)
