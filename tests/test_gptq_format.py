"""GPTQ checkpoints: bit-exact against AutoGPTQ's pack loop and kernels, zero
formats, baq's symmetric grid, mixed precision through `dynamic`, errors.

`_autogptq_pack` and `_autogptq_dequant` are numpy transcriptions, kept
independent of the module under test, of AutoGPTQ's reference code:
auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py `QuantLinear.pack` (the
per-bit-width while loops over rows and columns, with `zeros -= 1`), the
triton kernel `dequant_kernel_248` (auto_gptq/nn_modules/triton_utils/
dequant.py: shifts per row and column, `zeros + 1`, groups from g_idx) and,
for 3 bits, the `wf` table and straddle fix-ups of qlinear_cuda_old.py's
torch path.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from baq.export import gptq_format as gf
from baq.export.gptq_format import checkpoint as gf_checkpoint, packing as gf_packing

D_IN, D_OUT = 128, 64


def _pack3(dst, src, k, put):
  """AutoGPTQ's 3-bit loop: 32 values -> 3 words, 10 | 1 | 10 | 1 | 10."""
  i = row = 0
  while row < k:
    for j in range(i, i + 10):
      put(row, src(j) << (3 * (j - i)))
    i += 10
    put(row, src(i) << 30)
    row += 1
    put(row, (src(i) >> 2) & 1)
    i += 1
    for j in range(i, i + 10):
      put(row, src(j) << (3 * (j - i) + 1))
    i += 10
    put(row, src(i) << 31)
    row += 1
    put(row, (src(i) >> 1) & 0x3)
    i += 1
    for j in range(i, i + 10):
      put(row, src(j) << (3 * (j - i) + 2))
    i += 10
    row += 1


def _autogptq_pack(intweight, zeros, bits, v1=True):
  """qlinear_cuda_old.py `pack` from the integer weight on (uint32 arithmetic)."""
  intweight = intweight.astype(np.uint32)
  qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), np.uint32)
  def put_w(r, v):
    qweight[r] |= v.astype(np.uint32)
  if bits == 3:
    _pack3(qweight, lambda j: intweight[j], qweight.shape[0], put_w)
  else:
    i = row = 0
    while row < qweight.shape[0]:
      for j in range(i, i + (32 // bits)):
        qweight[row] |= intweight[j] << np.uint32(bits * (j - i))
      i += 32 // bits
      row += 1
  zeros = zeros.astype(np.int64) - (1 if v1 else 0)  # `zeros -= 1` (v1 only)
  zeros = zeros.astype(np.uint32)
  qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), np.uint32)
  def put_z(c, v):
    qzeros[:, c] |= v.astype(np.uint32)
  if bits == 3:
    _pack3(qzeros, lambda j: zeros[:, j], qzeros.shape[1], put_z)
  else:
    i = col = 0
    while col < qzeros.shape[1]:
      for j in range(i, i + (32 // bits)):
        qzeros[:, col] |= zeros[:, j] << np.uint32(bits * (j - i))
      i += 32 // bits
      col += 1
  return qweight.astype(np.int32), qzeros.astype(np.int32)


def _unpack3(words):
  """qlinear_cuda_old.py's 3-bit torch path on [k, n] words along axis 0."""
  wf = np.array([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                 [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                 [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], np.int64)
  w = words.astype(np.int64).reshape(words.shape[0] // 3, 3, 1, -1)
  w = (w >> wf[None, :, :, None]) & 0x7  # broadcasts like torch's expand(-1, -1, 12, -1)
  w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
  w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
  w = w & 0x7
  w = np.concatenate([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], axis=1)
  return w.reshape(-1, words.shape[-1])


def _autogptq_dequant(qweight, qzeros, scales, g_idx, bits):
  """dequant_kernel_248 (2/4/8 bits) / the 3-bit torch path, with `zeros + 1`."""
  maxq = 2**bits - 1
  d_in, d_out = g_idx.shape[0], scales.shape[1]
  qw, qz = qweight.view(np.uint32).astype(np.int64), qzeros.view(np.uint32).astype(np.int64)
  if bits == 3:
    w, z = _unpack3(qw), _unpack3(qz.T).T
  else:
    per = 32 // bits
    r, c = np.arange(d_in)[:, None], np.arange(d_out)[None, :]
    w = (qw[r // per, c] >> ((r % per) * bits)) & maxq
    gz = np.arange(scales.shape[0])[:, None]
    z = (qz[gz, c // per] >> ((c % per) * bits)) & maxq
  z = z + 1
  s = scales.astype(np.float32)
  return s[g_idx] * (w - z[g_idx]).astype(np.float32)


def _layer(bits, group_size, act_order, seed=0, d_in=D_IN, d_out=D_OUT):
  rng = np.random.default_rng(seed)
  g = d_in if group_size == -1 else group_size
  codes = rng.integers(0, 2**bits, size=(d_in, d_out))
  zeros = rng.integers(1, 2**bits, size=(d_in // g, d_out))  # v1 cannot hold 0
  scales = rng.uniform(0.01, 0.1, size=(d_in // g, d_out)).astype(np.float32)
  g_idx = None
  if act_order:  # GPTQ's act order: groups follow a permutation of the rows
    g_idx = np.empty(d_in, np.int64)
    g_idx[rng.permutation(d_in)] = np.arange(d_in) // g
  return codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_bit_exact_against_autogptq(bits, group_size, act_order):
  codes, scales, zeros, g_idx = _layer(bits, group_size, act_order, seed=bits)
  if act_order and group_size == 32:
    assert np.any(np.diff(g_idx) < 0) and len(set(g_idx[:32])) > 1  # non-contiguous
  p = gf.pack_layer(codes, scales, zeros, bits, group_size, g_idx)
  ref_qw, ref_qz_v1 = _autogptq_pack(codes, zeros, bits, v1=True)
  _, ref_qz_v2 = _autogptq_pack(codes, zeros, bits, v1=False)
  assert p["qweight"].dtype == np.int32 and p["qweight"].shape == (D_IN * bits // 32, D_OUT)
  np.testing.assert_array_equal(p["qweight"], ref_qw)
  np.testing.assert_array_equal(p["qzeros"], ref_qz_v2)  # pack_layer: GPTQModel's v2 form
  np.testing.assert_array_equal(gf_packing._encode_zeros("l", p["qzeros"], bits, "gptq"), ref_qz_v1)
  assert p["scales"].dtype == np.float16 and p["g_idx"].dtype == np.int32
  want_g = np.arange(D_IN) // (D_IN if group_size == -1 else 32) if g_idx is None else g_idx
  np.testing.assert_array_equal(p["g_idx"], want_g)
  ref_w = _autogptq_dequant(ref_qw, ref_qz_v1, p["scales"], p["g_idx"], bits)
  v1 = dict(p, qzeros=ref_qz_v1)
  np.testing.assert_array_equal(gf.unpack_layer(v1, bits, group_size, "gptq"), ref_w)
  np.testing.assert_array_equal(gf.unpack_layer(p, bits, group_size, "gptq_v2"), ref_w)
  s16 = scales.astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(ref_w, s16[want_g] * (codes - zeros[want_g]))


def test_hand_example_one_word():
  """Eight 4-bit codes 1..8 down column 0 fill qweight[0, 0] as 0x87654321;
  3-bit codes 0..31 down column 0 give AutoGPTQ's straddling words."""
  codes = np.zeros((32, 32), np.int64)
  codes[:8, 0] = np.arange(1, 9)
  zeros = np.full((1, 32), 8)
  p = gf.pack_layer(codes, np.ones((1, 32)), zeros, 4, -1)
  assert p["qweight"].view(np.uint32)[0, 0] == 0x87654321
  assert np.all(p["qweight"][1:, 0] == 0) and np.all(p["qweight"][:, 1:] == 0)
  assert np.all(p["qzeros"].view(np.uint32) == 0x88888888)  # v2: 8 in each nibble
  assert np.all(gf_packing._encode_zeros("l", p["qzeros"], 4, "gptq").view(np.uint32) == 0x77777777)
  c3 = np.zeros((32, 32), np.int64)
  c3[:, 0] = [7] * 32  # all ones: three full words
  q3 = gf.pack_layer(c3, np.ones((1, 32)), np.ones((1, 32)), 3, -1)["qweight"]
  assert [int(x) for x in q3.view(np.uint32)[:, 0]] == [0xFFFFFFFF] * 3
  c3[:, 0] = 0
  c3[10, 0] = 0b101  # code 10: low 2 bits at word 0 bits 30-31, top bit at word 1 bit 0
  q3 = gf.pack_layer(c3, np.ones((1, 32)), np.ones((1, 32)), 3, -1)["qweight"]
  assert [int(x) for x in q3.view(np.uint32)[:, 0]] == [1 << 30, 1, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_symmetric_round_trip(bits):
  rng = np.random.default_rng(bits)
  qmax = 2 ** (bits - 1) - 1
  c = rng.integers(-qmax - 1, qmax + 1, size=(D_IN, D_OUT))  # the full grid's range
  s = rng.lognormal(-5.0, 1.5, size=(D_IN // 32, D_OUT)).astype(np.float32)
  s[0, :4] = [1e-6, 3e-7, 2e-5, 6e-5]  # float16 subnormals
  q, z = gf.from_symmetric(c, s, bits)
  assert q.min() == 0 and q.max() == 2**bits - 1 and np.all(z == 2 ** (bits - 1))
  with pytest.raises(ValueError, match="symmetric codes"):
    gf.from_symmetric(np.full((2, 2), -qmax - 2), s, bits)
  w = gf.unpack_layer(gf.pack_layer(q, s, z, bits, 32), bits, 32, "gptq_v2")
  rows = np.arange(D_IN) // 32
  s16 = s.astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(w, c * s16[rows])  # exact: c * fp16(s)
  err = np.abs(w.astype(np.float64) - c * s[rows].astype(np.float64))
  bound = np.abs(c) * np.maximum(2.0**-11 * s[rows], 2.0**-25)
  assert np.all(err <= bound) and err.max() > 0
  normal = s[rows] >= 2.0**-14
  assert (err / np.maximum(bound, 1e-30))[normal & (c != 0)].max() > 0.5  # bound is tight


def _write(folder, layers, bits=4, fmt="gptq", dynamic=None, sym=True, desc_act=False, **kw):
  tensors = {"model.embed_tokens.weight": np.ones((10, D_IN), np.float16)}
  hf = {"model_type": "llama", "hidden_size": D_IN}
  return gf.write_checkpoint(str(folder), layers, tensors, hf, bits=bits, group_size=32,
                             desc_act=desc_act, sym=sym, checkpoint_format=fmt,
                             dynamic=dynamic, **kw)


def _sym_layer(bits, seed, d_out=D_OUT):
  rng = np.random.default_rng(seed)
  qmax = 2 ** (bits - 1) - 1
  c = rng.integers(-qmax, qmax + 1, size=(D_IN, d_out))
  s = rng.uniform(0.01, 0.1, size=(D_IN // 32, d_out)).astype(np.float32)
  q, z = gf.from_symmetric(c, s, bits)
  p = gf.pack_layer(q, s, z, bits, 32)
  return p, c * s.astype(np.float16).astype(np.float32)[np.arange(D_IN) // 32]


@pytest.mark.parametrize("bits", [3, 4])
def test_v1_v2_zero_offsets(tmp_path, bits):
  p, want = _sym_layer(bits, 0)
  name = "model.layers.0.self_attn.q_proj"
  for fmt in ("gptq", "gptq_v2"):
    _write(tmp_path / fmt, {name: dict(p, bias=np.arange(D_OUT))}, bits=bits, fmt=fmt)
  raw = {f: load_file(str(tmp_path / f / "model.safetensors")) for f in ("gptq", "gptq_v2")}
  v1, v2 = raw["gptq"][f"{name}.qzeros"], raw["gptq_v2"][f"{name}.qzeros"]
  z1 = gf_packing._unpack_cols(v1, bits)
  assert np.all(z1 == 2 ** (bits - 1) - 1) and np.all(gf_packing._unpack_cols(v2, bits) == 2 ** (bits - 1))
  if bits == 4:
    assert np.all(v1.view(np.uint32) == 0x77777777) and np.all(v2.view(np.uint32) == 0x88888888)
  np.testing.assert_array_equal(v1, _autogptq_pack(np.zeros((32, 1)), z1 + 1, bits)[1])
  for fmt in ("gptq", "gptq_v2"):
    w, qcfg = gf.read_checkpoint(str(tmp_path / fmt))
    assert qcfg["checkpoint_format"] == fmt and qcfg["quant_method"] == "gptq"
    np.testing.assert_array_equal(w[name], want)
    assert raw[fmt][f"{name}.bias"].dtype == np.float16
  # Read as the other format, every zero is off by one: weight shifts by one scale.
  stored = {f: raw["gptq"][f"{name}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")}
  w_wrong = gf.unpack_layer(stored, bits, 32, "gptq_v2")
  s16 = stored["scales"].astype(np.float32)[np.arange(D_IN) // 32]
  np.testing.assert_allclose(w_wrong - want, s16, rtol=1e-6)


def test_mixed_precision_through_dynamic(tmp_path):
  a, b = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
  pa, wa = _sym_layer(3, 1)
  pb, wb = _sym_layer(4, 2)
  dyn = gf.dynamic_overrides({a: 3, b: 4}, default_bits=4)
  assert dyn == {"+:model\\.layers\\.0\\.mlp\\.up_proj$": {"bits": 3}}
  with pytest.raises(ValueError, match=a):  # without `dynamic`, 3-bit a mismatches bits=4
    _write(tmp_path / "no_dyn", {a: pa, b: pb})
  qcfg = _write(tmp_path / "ckpt", {a: pa, b: pb}, dynamic=dyn)
  on_disk = json.load(open(tmp_path / "ckpt" / "quantize_config.json"))
  config = json.load(open(tmp_path / "ckpt" / "config.json"))
  assert on_disk == qcfg and config["quantization_config"] == qcfg
  assert config["model_type"] == "llama" and on_disk["dynamic"] == dyn
  assert {k: on_disk[k] for k in ("bits", "group_size", "desc_act", "sym", "true_sequential")} \
      == {"bits": 4, "group_size": 32, "desc_act": False, "sym": True, "true_sequential": True}
  w, _ = gf.read_checkpoint(str(tmp_path / "ckpt"))
  assert sorted(w) == [a, b]
  np.testing.assert_array_equal(w[a], wa)
  np.testing.assert_array_equal(w[b], wb)
  os.remove(tmp_path / "ckpt" / "quantize_config.json")  # falls back on config.json
  w2, qcfg2 = gf.read_checkpoint(str(tmp_path / "ckpt"))
  assert qcfg2 == qcfg and np.array_equal(w2[a], wa)
  # First matching "+:" wins; "-:" excludes whatever it matches.
  base = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True}
  first = {"+:.*layers\\.0\\.": {"bits": 3}, "+:.*up_proj$": {"bits": 8, "group_size": 64}}
  assert gf_checkpoint._resolve(dict(base, dynamic=first), a) == dict(base, bits=3)
  assert gf_checkpoint._resolve(dict(base, dynamic=first), b) == dict(base, bits=8, group_size=64)
  neg = {"+:.*": {"bits": 3}, "-:lm_head": {}}  # "-:" keys are tried first
  assert gf_checkpoint._resolve(dict(base, dynamic=neg), "lm_head") is None
  with pytest.raises(ValueError, match="excludes"):
    _write(tmp_path / "neg", {a: pa}, dynamic={"-:model\\.layers\\.0": {}})


def test_act_order_checkpoint(tmp_path):
  codes, scales, zeros, g_idx = _layer(4, 32, True)
  p = gf.pack_layer(codes, scales, zeros, 4, 32, g_idx)
  with pytest.raises(ValueError, match="desc_act=False"):
    _write(tmp_path / "bad", {"l": p}, sym=False)
  _write(tmp_path / "ok", {"l": p}, sym=False, desc_act=True)
  w, qcfg = gf.read_checkpoint(str(tmp_path / "ok"))
  assert qcfg["desc_act"] is True
  np.testing.assert_array_equal(w["l"], gf.unpack_layer(p, 4, 32, "gptq_v2"))


def test_errors(tmp_path):
  codes, scales, zeros, _ = _layer(4, 32, False)
  with pytest.raises(ValueError, match="allowed bits are 2, 3, 4, 8"):
    gf.pack_layer(codes, scales, zeros, 5, 32)
  with pytest.raises(ValueError, match="bits=6 has no GPTQ packing; allowed bits are 2, 3, 4, 8"):
    _write(tmp_path / "b6", {}, bits=6)
  with pytest.raises(ValueError, match="layer x: bits=5.*allowed bits are 2, 3, 4, 8"):
    gf.dynamic_overrides({"x": 5}, 4)
  with pytest.raises(ValueError, match="multiples of 32"):
    gf.pack_layer(codes[:40], scales, zeros, 4, 8)
  with pytest.raises(ValueError, match="group_size 48 does not divide d_in=128"):
    gf.pack_layer(codes, scales, zeros, 4, 48)
  with pytest.raises(ValueError, match=r"scales \(2, 64\).*\(4, 64\)"):
    gf.pack_layer(codes, scales[:2], zeros, 4, 32)
  p, _ = _sym_layer(4, 0)
  bad = dict(p, scales=p["scales"][:, :32])
  with pytest.raises(ValueError, match=r"layer model\.layers\.3\.o_proj: scales \(4, 32\)"):
    _write(tmp_path / "shape", {"model.layers.3.o_proj": bad})
  with pytest.raises(ValueError, match="zero point 0"):
    z0 = gf.pack_layer(codes, scales, np.zeros_like(zeros), 4, 32)
    _write(tmp_path / "z0", {"l": z0}, sym=False)
  assert not os.listdir(tmp_path)  # validation errors write nothing at all
  # An error in the middle of writing (config.json fails) leaves nothing either.
  folder = tmp_path / "partial"
  folder.mkdir()
  with pytest.raises(TypeError):
    gf.write_checkpoint(str(folder), {"l": p}, {}, {"unserializable": {1, 2}}, bits=4,
                        group_size=32, desc_act=False, sym=True)
  assert os.listdir(folder) == [] and os.listdir(tmp_path) == ["partial"]
  _write(folder, {"l": p})  # an empty folder is replaced
  with pytest.raises(FileExistsError):
    _write(folder, {"l": p})
  os.remove(folder / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    gf.read_checkpoint(str(folder))
  with pytest.raises(FileNotFoundError, match="quantize_config.json"):
    gf.read_checkpoint(str(tmp_path / "missing"))


@pytest.mark.parametrize("bits", [3, 4])
def test_padded_dimensions_read_as_gptqmodel_packs_them(bits):
  """GPTQModel packs a d_in or d_out that is no multiple of 32 with a padded last word
  (stories260K's 172): the reader takes the first codes and zero points."""
  from baq.export.gptq_format import packing
  rng = np.random.default_rng(bits)
  d_in, d_out, pad = 172, 172, 192
  codes = rng.integers(0, 2**bits, (d_in, d_out))
  zeros = rng.integers(0, 2**bits, (1, d_out))
  scales = rng.uniform(0.01, 0.1, (1, d_out)).astype(np.float16)
  full = np.zeros((pad, pad), np.int64)
  full[:d_in, :d_out] = codes
  zfull = np.zeros((1, pad), np.int64)
  zfull[:, :d_out] = zeros
  p = {"qweight": packing._pack_rows(full, bits)[:packing._words(d_in, bits), :d_out],
       "qzeros": packing._pack_cols(zfull, bits)[:, :packing._words(d_out, bits)],
       "scales": scales, "g_idx": np.zeros(d_in, np.int32)}
  got = gf.unpack_layer(p, bits, -1, "gptq_v2")
  np.testing.assert_array_equal(got, (codes - zeros).astype(np.float32) * scales.astype(np.float32))
  p["qweight"] = p["qweight"][:-1]
  with pytest.raises(ValueError, match="does not hold d_in=172"):
    gf.unpack_layer(p, bits, -1, "gptq_v2")
