"""baq's quantized LMs as block-quantized GGUF files (`baq.export.gguf_quant`).

The reference is the `gguf` package (llama.cpp's own Python reader and
codec): every written tensor is read back with `gguf.GGUFReader` and
dequantized with `gguf.quants.dequantize`, then compared bit for bit with
baq's dequantized weight in GGUF's layout (q/k rows permuted for "llama",
GPT-2's fused, transposed c_attn). Tiny random models; llama.cpp itself
runs the files in benchmarks/gguf_export_check.py.
"""

import os

import flax.traverse_util as tu
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.export.gguf_quant import BIT_TYPES, export_gguf
from baq.models.lm import LM_FAMILIES
from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.models.lm.gguf import load_gguf
from baq.models.lm.gguf_arch import to_gguf_tensors
from baq.ptq import decoder as gd
from baq.quant import gptq
from baq.study.lm import exports
from configs import lm as lm_config

FAMILY = {"llama": dict(n_kv_heads=2, tie_embeddings=False),
          "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu_tanh", attn_bias=True,
                       out_bias=True, mlp_bias=True, tie_embeddings=True)}


def model(family="llama", d_ff=64, seed=0):
  cfg = DecoderConfig(**dict(vocab_size=40, d_model=64, n_layers=1, n_heads=4, d_ff=d_ff,
                             max_len=32), **FAMILY[family])
  shapes = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0),
                                                      jnp.zeros((1, 1), jnp.int32)))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return cfg, jax.tree.unflatten(tree, [(0.3 * rng.standard_normal(x.shape)).astype(np.float32)
                                        for x in leaves])


def rtn(cfg, params, bits, scale_dtype="float16", group_size=None):
  """(quantized params, records) as quantize_decoder's RTN gives them."""
  flat = tu.flatten_dict(params, sep="/")
  records = {}
  for name in gd.quantizable_layers(params, cfg.n_layers):
    r = gptq.round_to_nearest(flat[f"{name}/kernel"], bits, group_size, scale_dtype)
    flat[f"{name}/kernel"] = np.asarray(r.weight)
    records[name] = dict(bits=bits, codes=np.asarray(r.codes), scales=np.asarray(r.scales))
  return tu.unflatten_dict(flat, sep="/"), records


def read_back(path):
  """GGUF name -> (type, float32 weights) by the gguf package alone."""
  return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type))
          for t in gguf.GGUFReader(path).tensors}


def bits_of(a):
  return (np.asarray(a, np.float32) + np.float32(0)).view(np.uint32)  # -0.0 as +0.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("bits,qtype", [(4, "Q4_0"), (8, "Q8_0"), (5, "Q5_0"), (2, "Q4_0"),
                                        (3, "Q4_0")])
def test_fp16_scaled_grids_are_written_exactly(tmp_path, family, bits, qtype):
  cfg, params = model(family)
  q, records = rtn(cfg, params, bits)
  path = str(tmp_path / "m.gguf")
  rec = export_gguf(path, family, cfg, q, records)
  assert rec["exact"] and BIT_TYPES[bits] == qtype.lower()
  want = to_gguf_tensors(family, LM_FAMILIES.get(family), cfg,
                         LM_FAMILIES.get(family).from_params(q, cfg))
  got = read_back(path)
  for name, r in rec["tensors"].items():
    assert (r["type"], r["path"], r["max_abs_diff"]) == (qtype.lower(), "codes", 0.0)
    assert got[name][0] == qtype
    np.testing.assert_array_equal(bits_of(got[name][1]), bits_of(want[name]))
  assert len(rec["tensors"]) == (7 if family == "llama" else 4)  # c_attn fuses q, k, v
  # baq's own reader gives the quantized model back.
  _, variables, _, _ = load_gguf(path)
  for name in records:
    np.testing.assert_array_equal(
        bits_of(tu.flatten_dict(variables["params"], sep="/")[f"{name}/kernel"]),
        bits_of(tu.flatten_dict(q, sep="/")[f"{name}/kernel"]))


def test_groups_of_32_are_exact_and_smaller_groups_are_requantized(tmp_path):
  cfg, params = model()
  q, records = rtn(cfg, params, 4, group_size=32)
  assert export_gguf(str(tmp_path / "g32.gguf"), "llama", cfg, q, records,
                     group_size=32)["exact"]
  q, records = rtn(cfg, params, 4, group_size=16)
  rec = export_gguf(str(tmp_path / "g16.gguf"), "llama", cfg, q, records, group_size=16,
                    verbose=False)
  r = rec["tensors"]["blk.0.attn_q.weight"]
  assert r["path"] == "requantized" and not r["exact"] and "within a 32-value block" in r[
      "reason"]
  assert 0 < r["rel_error"] < 0.5


def test_float32_scales_keep_the_codes_but_are_not_exact(tmp_path):
  cfg, params = model()
  q, records = rtn(cfg, params, 4, scale_dtype="float32")
  rec = export_gguf(str(tmp_path / "m.gguf"), "llama", cfg, q, records, verbose=False)
  for r in rec["tensors"].values():
    assert r["path"] == "codes" and not r["exact"] and "float16-exact" in r["reason"]
    assert 0 < r["rel_error"] < 2.0**-11  # the fp16 rounding of the scales only


def test_a_k_quant_is_requantized_and_a_row_it_cannot_hold_falls_back(tmp_path):
  cfg, params = model(d_ff=256)  # ffn_down's rows hold 256-value blocks, the others do not
  q, records = rtn(cfg, params, 2)
  rec = export_gguf(str(tmp_path / "m.gguf"), "llama", cfg, q, records, bit_types={2: "q2_k"},
                    verbose=False)
  down, gate = rec["tensors"]["blk.0.ffn_down.weight"], rec["tensors"]["blk.0.ffn_gate.weight"]
  assert (down["type"], down["path"], down["exact"]) == ("q2_k", "requantized", False)
  assert down["max_abs_diff"] > 0 and "q2_k is not one scale per 32 codes" in down["reason"]
  # llama.cpp stores q2_k rows of 64 as q4_0, which holds the 2-bit codes exactly.
  assert (gate["type"], gate["path"], gate["exact"]) == ("q4_0", "codes", True)
  assert "llama.cpp's fallback" in gate["reason"]
  assert read_back(str(tmp_path / "m.gguf"))["blk.0.ffn_down.weight"][0] == "Q2_K"


def test_rows_not_of_32_stay_f16_or_f32_and_strict_refuses_leaving_nothing(tmp_path):
  cfg, params = model(d_ff=80)  # stories260K's ffn_down has rows of 172
  q, records = rtn(cfg, params, 4)
  rec = export_gguf(str(tmp_path / "a.gguf"), "llama", cfg, q, records, verbose=False)
  down = rec["tensors"]["blk.0.ffn_down.weight"]
  assert (down["type"], down["path"]) == ("f16", "f16") and "rows of 80" in down["reason"]
  assert read_back(str(tmp_path / "a.gguf"))["blk.0.ffn_down.weight"][0] == "F16"
  rec = export_gguf(str(tmp_path / "b.gguf"), "llama", cfg, q, records, fallback="f32",
                    verbose=False)
  assert rec["exact"] and rec["tensors"]["blk.0.ffn_down.weight"]["type"] == "f32"
  target = tmp_path / "new" / "c.gguf"
  with pytest.raises(ValueError, match=r"strict.*blk\.0\.ffn_down\.weight \(q4_0 -> f16"):
    export_gguf(str(target), "llama", cfg, q, records, strict=True)
  assert not (tmp_path / "new").exists()


def test_bad_requests_are_refused_before_writing(tmp_path):
  cfg, params = model()
  q, records = rtn(cfg, params, 4)
  target = tmp_path / "new" / "m.gguf"
  with pytest.raises(ValueError, match=r"bit_types\[4\]: ggml type 'q4_k_m' is not one of .*q4_0"):
    export_gguf(str(target), "llama", cfg, q, records, bit_types={4: "q4_k_m"})
  with pytest.raises(ValueError, match="fallback"):
    export_gguf(str(target), "llama", cfg, q, records, fallback="bf16")
  bad = {k: dict(r, codes=r["codes"] + 1) if k.endswith("q_proj") else r
         for k, r in records.items()}
  with pytest.raises(ValueError, match=r"block_0/attn/q_proj: codes x scales"):
    export_gguf(str(target), "llama", cfg, q, bad)
  with pytest.raises(ValueError, match="nothing quantized"):
    export_gguf(str(target), "llama", cfg, q, {})
  assert not (tmp_path / "new").exists()


def test_an_asymmetric_grid_is_exact_in_q4_1(tmp_path):
  cfg, params = model()
  flat = tu.flatten_dict(params, sep="/")
  rng = np.random.default_rng(1)
  records = {}
  for name in gd.quantizable_layers(params, cfg.n_layers):
    d_in, d_out = flat[f"{name}/kernel"].shape
    codes = rng.integers(0, 16, (d_in, d_out))
    zeros = rng.integers(0, 16, (1, d_out)).astype(np.float32)
    # Scales of 7 significant bits: -zero x scale (<= 11 bits) is fp16-exact.
    scales = (rng.integers(64, 128, (1, d_out)) / 2048).astype(np.float32)
    flat[f"{name}/kernel"] = ((codes - zeros) * scales).astype(np.float32)
    records[name] = dict(bits=4, codes=codes, scales=scales, zeros=zeros)
  q = tu.unflatten_dict(flat, sep="/")
  rec = export_gguf(str(tmp_path / "a.gguf"), "llama", cfg, q, records, verbose=False,
                    tensor_types={r".*": "q4_1"})
  assert rec["exact"] and {r["type"] for r in rec["tensors"].values()} == {"q4_1"}
  # As q4_0 the codes minus zeros span [-15, 15]: beyond its 16 levels, so re-quantized.
  rec = export_gguf(str(tmp_path / "b.gguf"), "llama", cfg, q, records, verbose=False)
  r = rec["tensors"]["blk.0.attn_q.weight"]
  assert r["path"] == "requantized" and "beyond q4_0's range" in r["reason"]
  # Full fp16 scales: the minimums -zero x scale need more bits than fp16 has.
  name = "block_0/attn/q_proj"
  s = ((rng.integers(512, 1024, (1, 64)) * 2 + 1) / 2.0**16).astype(np.float32)  # 11 bits
  records[name] = dict(records[name], scales=s)
  flat[f"{name}/kernel"] = ((records[name]["codes"] - records[name]["zeros"]) * s).astype(
      np.float32)
  rec = export_gguf(str(tmp_path / "c.gguf"), "llama", cfg, tu.unflatten_dict(flat, sep="/"),
                    records, verbose=False, tensor_types={r".*": "q4_1"})
  r = rec["tensors"]["blk.0.attn_q.weight"]
  assert not r["exact"] and "minimums -zero x scale are not float16-exact" in r["reason"]
  assert 0 < r["rel_error"] < 2.0**-11


def test_float16_scales_in_gptq_and_the_study_export(tmp_path, capsys):
  rng = np.random.default_rng(0)
  w, x = rng.standard_normal((64, 48)), rng.standard_normal((256, 64))
  r = gptq.gptq(w, 2 * x.T @ x / 256, 4, group_size=32, scale_dtype="float16")
  s = np.asarray(r.scales)
  assert s.shape == (2, 48) and np.array_equal(s.astype(np.float16).astype(np.float32), s)
  np.testing.assert_array_equal(np.asarray(r.weight), np.asarray(r.codes) * np.repeat(s, 32, 0))
  with pytest.raises(ValueError, match="scale_dtype must be one of float32, float16"):
    gptq.gptq(w, x.T @ x, 4, scale_dtype="bfloat16")
  c = lm_config.get_config("tiny")
  assert exports.scale_dtype(c) == "float32"
  c.export = "gguf"
  assert exports.scale_dtype(c) == "float16"
  c.quant.scale_dtype = "half"
  with pytest.raises(ValueError, match="quant.scale_dtype"):
    exports.scale_dtype(c)
  # The study's GGUF export of a GPT-2 GPTQ'd by quantize_decoder, as `run_seed` calls it.
  c.quant.scale_dtype = "auto"
  cfg, params = model("gpt2")
  lm = CausalLM(cfg)
  ids = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
  q, records = gd.quantize_decoder(lm, {"params": params}, gd.Tokens(ids, np.full(8, 16)),
                                   bits=3, options=gd.Options(scale_dtype=exports.scale_dtype(c)))
  built = dict(tokenizer=None, family="gpt2", hf_config={"model_type": "gpt2"})
  path, rec = exports.export(c, str(tmp_path / "seed0"), "gptq@3", LM_FAMILIES.get("gpt2"), cfg,
                             params, q, records, built)
  assert path == str(tmp_path / "seed0" / "gguf" / "gptq@3.gguf") and os.path.isfile(path)
  assert rec["exact"] and rec["tensors"]["blk.0.attn_qkv.weight"]["type"] == "q4_0"
