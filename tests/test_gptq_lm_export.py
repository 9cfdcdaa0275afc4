"""GPTQ checkpoints of baq's block-by-block GPTQ'd language models (`baq.export.gptq_lm`).

Small random GPT-2, OPT and Llama (grouped-query) models are GPTQ'd with
`quantize_decoder` at mixed bits (4 on attention, 3 on the MLP), with and
without groups, and exported. The files are read back here with numpy alone
(no baq unpacking): the bit stream of 32 codes per `bits` words, GPTQ's
W = s[g_idx] * (q - z[g_idx]) with v1's +1 on stored zero points, and the
`dynamic` overrides resolved as GPTQModel's `dynamic_get` does. RTN models
(whose records carry no codes) export too.
"""

import json
import os
import re

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from baq.export import gptq_lm
from baq.models.lm import LM_FAMILIES
from baq.models.lm.decoder import CausalLM
from baq.quant import gptq
from baq.ptq import decoder as gd

V = 61
HF = {
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_positions=32, n_embd=64, n_layer=2,
                 n_head=4, n_inner=128),
    "opt": dict(model_type="opt", vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64,
                do_layer_norm_before=True, activation_function="relu"),
    # Grouped-query attention: k/v_proj are [64, 32].
    "llama": dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False),
}
# (family, group_size, checkpoint_format): every family, with and without groups.
CASES = [("gpt2", None, "gptq"), ("gpt2", 32, "gptq"), ("opt", None, "gptq_v2"),
         ("llama", 32, "gptq")]
# One module of each family and the baq layers it holds.
EXAMPLES = {"gpt2": ("transformer.h.0.attn.c_attn",
                     ("block_0/attn/q_proj", "block_0/attn/k_proj", "block_0/attn/v_proj")),
            "opt": ("model.decoder.layers.1.self_attn.out_proj", ("block_1/attn/o_proj",)),
            "llama": ("model.layers.1.mlp.gate_proj", ("block_1/mlp/gate_proj",))}
IDS = np.random.default_rng(0).integers(0, V, (4, 12)).astype(np.int32)
CALIB = gd.Tokens(IDS, np.array([12, 12, 9, 7], np.int32))


def _bits(name):
  return 3 if "/mlp/" in name else 4


def _model(family, hf=None):
  fam = LM_FAMILIES.get(family)
  cfg = fam.config_from_hf(hf or HF[family])
  model = CausalLM(cfg)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  # Larger than the 0.02 init, so that logits (~2) and quantization errors show.
  return fam, cfg, model, jax.tree.map(lambda x: 4 * x if x.ndim == 2 else x, params)


def _tokenizer():
  tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


@pytest.mark.parametrize("family", list(HF))
def test_hf_modules_are_the_from_params_weights(family):
  """Each module's weight is its layers' kernels side by side, in the family's layout,
  and every quantizable layer is in exactly one module."""
  fam, cfg, _, params = _model(family)
  modules, sd = fam.hf_modules(cfg), fam.from_params(params, cfg)
  paths = [p for ps in modules.values() for p in ps]
  assert sorted(paths) == sorted(gd.quantizable_layers(params, cfg.n_layers))
  assert len(modules) == cfg.n_layers * {"gpt2": 4, "opt": 6}.get(family, 7)
  for module, ps in modules.items():
    kernel = _leaves(params, ps)
    np.testing.assert_array_equal(sd[f"{module}.weight"], kernel if fam.hf_conv1d else kernel.T)
  assert fam.hf_conv1d == (family == "gpt2")
  module, layers = EXAMPLES[family]
  assert modules[module] == layers


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-g{c[1]}-{c[2]}")
def exported(request, tmp_path_factory):
  family, group_size, fmt = request.param
  fam, cfg, model, params = _model(family)
  bits = {n: _bits(n) for n in gd.quantizable_layers(params, cfg.n_layers)}
  q, records = gd.quantize_decoder(model, {"params": params}, CALIB, bits=bits,
                                   options=gd.Options(group_size=group_size))
  folder = str(tmp_path_factory.mktemp(family) / "ckpt")
  qcfg = gptq_lm.export_gptq(folder, family, cfg, params, q, records, HF[family],
                             group_size=group_size, checkpoint_format=fmt, tokenizer=_tokenizer())
  return dict(family=family, fam=fam, cfg=cfg, model=model, params=params, q=q,
              records=records, folder=folder, qcfg=qcfg, group_size=group_size, fmt=fmt)


def _stream(words, bits):
  """[k*bits, m] int32 -> [k*32, m]: each `bits` words (axis 0) are one little-endian
  32*bits-bit stream whose j-th `bits`-bit field is code j."""
  w = words.view(np.uint32).astype(np.uint64)
  runs, m = w.shape[0] // bits, w.shape[1]
  bit = (w.reshape(runs, bits, m)[..., None] >> np.arange(32, dtype=np.uint64)) & 1
  fields = bit.transpose(0, 2, 1, 3).reshape(runs, m, 32, bits)  # stream bit t = word*32 + bit
  codes = (fields << np.arange(bits, dtype=np.uint64)).sum(-1)
  return codes.transpose(0, 2, 1).reshape(runs * 32, m).astype(np.int64)


def _resolve(qcfg, module):
  """GPTQModel's dynamic_get: "-:" keys first, then the first re.match wins."""
  base = {k: qcfg[k] for k in ("bits", "group_size")}
  dyn = qcfg.get("dynamic", {})
  if any(re.match(k[2:], module) for k in dyn if k.startswith("-:")):
    return None
  for k, v in dyn.items():
    if not k.startswith("-:") and re.match(k.removeprefix("+:"), module):
      return {**base, **v}
  return base


def _dequant(t, module, bits, fmt):
  q = _stream(t[f"{module}.qweight"], bits)
  z = _stream(np.ascontiguousarray(t[f"{module}.qzeros"].T), bits).T + (fmt == "gptq")
  s, g_idx = t[f"{module}.scales"], t[f"{module}.g_idx"]
  assert s.dtype == np.float16
  return s.astype(np.float32)[g_idx] * (q - z[g_idx]), q


def _leaves(params, paths, leaf="kernel"):
  """The layers' `leaf`s, concatenated along the output axis (None if they have none)."""
  m = {"/".join(k[:-1]): np.asarray(v) for k, v in tu.flatten_dict(params).items()
       if k[-1] == leaf}
  return np.concatenate([m[p] for p in paths], axis=-1) if paths[0] in m else None


def test_files_unpack_to_the_codes_times_fp16_scales(exported):
  e = exported
  t = load_file(os.path.join(e["folder"], "model.safetensors"))
  for module, paths in e["fam"].hf_modules(e["cfg"]).items():
    r = _resolve(e["qcfg"], module)
    w, q = _dequant(t, module, r["bits"], e["fmt"])
    codes = np.concatenate([e["records"][p]["codes"] for p in paths], axis=1)
    scales = np.concatenate([np.atleast_2d(e["records"][p]["scales"]) for p in paths], axis=1)
    rows = scales[np.arange(len(codes)) // (e["group_size"] or len(codes))]
    assert q.min() >= 0 and np.array_equal(q - 2 ** (r["bits"] - 1), codes)  # full grid: 0 too
    np.testing.assert_array_equal(w, codes * rows.astype(np.float16).astype(np.float32))
    # ... and within fp16's rounding of the scale of the fake-quantized kernels.
    kernel = _leaves(e["q"], paths).astype(np.float64)
    bound = np.abs(codes) * np.abs(rows) * 2.0**-11 + 1e-12
    assert np.all(np.abs(w - kernel) <= bound) and np.abs(w - kernel).max() > 0
    assert f"{module}.weight" not in t
    bias = _leaves(e["q"], paths, "bias")
    assert (bias is None) == (e["family"] == "llama") == (f"{module}.bias" not in t)
    if bias is not None:
      np.testing.assert_array_equal(t[f"{module}.bias"], bias.astype(np.float16))
  embed = [k for k in t if k.endswith(("wte.weight", "embed_tokens.weight"))]
  np.testing.assert_array_equal(t[embed[0]], e["params"]["embed"]["embedding"])


def test_quantize_config_holds_the_per_layer_bits(exported):
  e = exported
  with open(os.path.join(e["folder"], "quantize_config.json")) as f:
    qcfg = json.load(f)
  with open(os.path.join(e["folder"], "config.json")) as f:
    assert json.load(f)["quantization_config"] == qcfg
  assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"],
          qcfg["checkpoint_format"]) == (4, e["group_size"] or -1, False, True, e["fmt"])
  modules = e["fam"].hf_modules(e["cfg"])
  for module, paths in modules.items():
    assert _resolve(qcfg, module) == {"bits": _bits(paths[0]), "group_size": qcfg["group_size"]}
  n_mlp = sum("/mlp/" in paths[0] for paths in modules.values())
  assert len(qcfg["dynamic"]) == n_mlp and n_mlp == {"llama": 6}.get(e["family"], 4)


def test_load_gptq_runs_the_quantized_model(exported):
  e = exported
  model, variables, tokenizer, family = gptq_lm.load_gptq(e["folder"])
  assert family == e["family"] and model.config == e["cfg"]
  assert tokenizer.encode("w3 w7").ids == [3, 7]
  got = np.asarray(model.apply(variables, IDS))
  want = np.asarray(e["model"].apply({"params": e["q"]}, IDS))
  float_logits = np.asarray(e["model"].apply({"params": e["params"]}, IDS))
  scale = np.abs(want).max()
  assert scale > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * scale)
  assert np.abs(got - want).max() < np.abs(float_logits - want).max() / 50


def _rtn(params, n_layers, bits, group_size=None, skip=()):
  """What quantize_decoder with method="rtn" returns, less its statistics: `gptq.rtn`
  kernels and records of bits and method, without codes; `skip` stays float."""
  flat, records = tu.flatten_dict(params, sep="/"), {}
  for name in gd.quantizable_layers(params, n_layers):
    if name not in skip:
      k = f"{name}/kernel"
      flat[k] = jnp.asarray(gptq.rtn(np.asarray(flat[k], np.float64), bits(name), group_size),
                            jnp.float32)
      records[name] = dict(bits=bits(name), method="rtn")
  return tu.unflatten_dict(flat, sep="/"), records


def test_rtn_models_export_and_unrecorded_layers_stay_float(tmp_path):
  fam, cfg, model, params = _model("llama")
  bits = lambda n: 4 if "/mlp/" in n else 8  # pylint: disable=unnecessary-lambda-assignment
  float_layer = "block_1/mlp/down_proj"
  q, records = _rtn(params, cfg.n_layers, bits, 32, skip=(float_layer,))
  folder = str(tmp_path / "rtn")
  qcfg = gptq_lm.export_gptq(folder, "llama", cfg, params, q, records, HF["llama"], group_size=32)
  assert qcfg["bits"] == 8 and _resolve(qcfg, "model.layers.1.mlp.down_proj") is None
  t = load_file(os.path.join(folder, "model.safetensors"))
  for module, (path,) in fam.hf_modules(cfg).items():
    kernel, w_float = _leaves(q, (path,)), _leaves(params, (path,))
    if path == float_layer:
      np.testing.assert_array_equal(t[f"{module}.weight"], w_float.T)
      assert f"{module}.qweight" not in t
      continue
    b = bits(path)
    hi = np.abs(w_float).reshape(-1, 32, w_float.shape[1]).max(axis=1)  # groups of 32 rows
    rows = np.repeat(hi / np.float32(2 ** (b - 1) - 1), 32, axis=0)
    codes = np.rint(kernel / rows)
    np.testing.assert_array_equal(codes * rows, kernel)  # the absmax grid, independently
    w, _ = _dequant(t, module, _resolve(qcfg, module)["bits"], "gptq")
    np.testing.assert_array_equal(w, codes * rows.astype(np.float16).astype(np.float32))
  loaded, variables, tokenizer, _ = gptq_lm.load_gptq(folder)
  assert tokenizer is None
  want = np.asarray(model.apply({"params": q}, IDS))
  np.testing.assert_allclose(np.asarray(loaded.apply(variables, IDS)), want, rtol=1e-2,
                             atol=1e-2 * np.abs(want).max())


def test_export_refusals_name_the_layer(tmp_path):
  _, cfg, _, params = _model("gpt2")
  folder = str(tmp_path / "x")
  bits = lambda n: 3 if n == "block_0/attn/k_proj" else 4  # pylint: disable=unnecessary-lambda-assignment
  q, records = _rtn(params, cfg.n_layers, bits)
  with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*k_proj.*3"):
    gptq_lm.export_gptq(folder, "gpt2", cfg, params, q, records, HF["gpt2"])
  assert not os.path.exists(folder)
  q, records = _rtn(params, cfg.n_layers, _bits, skip=("block_1/attn/v_proj",))
  with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn.*only some"):
    gptq_lm.export_gptq(folder, "gpt2", cfg, params, q, records, HF["gpt2"])
  q, records = _rtn(params, cfg.n_layers, _bits)
  with pytest.raises(ValueError, match="does not describe"):
    gptq_lm.export_gptq(folder, "gpt2", cfg, params, q, records, dict(HF["gpt2"], n_layer=3))
  with pytest.raises(ValueError, match=r"block_0/attn/q_proj: codes x scales"):
    gptq_lm.export_gptq(folder, "gpt2", cfg, params, q, records, HF["gpt2"], group_size=32)
  gptq_records = {k: dict(r, method="gptq") for k, r in records.items()}
  with pytest.raises(ValueError, match=r"block_0/attn/q_proj: its record has no codes"):
    gptq_lm.export_gptq(folder, "gpt2", cfg, params, q, gptq_records, HF["gpt2"])
  hf = dict(HF["opt"], ffn_dim=80)
  _, cfg, _, params = _model("opt", hf)
  q, records = _rtn(params, cfg.n_layers, _bits)
  with pytest.raises(ValueError, match=r"model\.decoder\.layers\.0\.fc1.*\(64, 80\).*32"):
    gptq_lm.export_gptq(folder, "opt", cfg, params, q, records, hf)
  assert not os.path.exists(folder)


def test_load_names_a_missing_file(tmp_path):
  _, cfg, _, params = _model("opt")
  q, records = _rtn(params, cfg.n_layers, _bits)
  for missing in ("model.safetensors", "config.json"):
    folder = str(tmp_path / missing)
    gptq_lm.export_gptq(folder, "opt", cfg, params, q, records, HF["opt"])
    gptq_lm.load_gptq(folder)  # complete, it loads
    os.remove(os.path.join(folder, missing))
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
      gptq_lm.load_gptq(folder)
