"""Qwix interop: an allocation as rules; Qwix's PTQ gives baq's round-to-nearest logits."""

import jax
import numpy as np
import pytest

qwix = pytest.importorskip("qwix")

from baq.export import packed  # noqa: E402
from baq.export import qwix as qwix_export  # noqa: E402
from baq.models import build_model  # noqa: E402
from baq.quant import QuantMode, QuantSpec, Quantizer  # noqa: E402
from baq.variables import apply_model  # noqa: E402


def _baq(name, layer_bits, granularity="channel", scale_method="absmax", size=12, **kw):
  """A model whose layers `layer_bits` ({regex: bits}) are quantized, deployed as is."""
  rules = tuple((k, QuantSpec(init_bits=float(b), granularity=granularity,
                              scale_method=scale_method)) for k, b in layer_bits.items())
  model = build_model(name, 3, Quantizer(rules), **kw)
  x = jax.random.normal(jax.random.key(0), (6, size, size, 3))
  # jitted: eager, every initializer and op compiles on its own (seconds a model)
  v = dict(jax.jit(model.init)({"params": jax.random.key(1), "quant": jax.random.key(2)}, x))
  deploy = model.clone(quant=model.quant.replace(mode=QuantMode.EVAL))
  want = np.asarray(jax.jit(lambda v, x: apply_model(deploy, v, x))(v, x))
  fmodel = build_model(name, 3, None, **kw)
  fvars = dict(v, params=packed.dequantized_params(v["params"], {}))
  return packed.capture_codes(model, v, x[:1]), fmodel, fvars, x, want


def _qwix_logits(captured, fmodel, fvars, x, tmp_path):
  args = qwix_export.rules(captured, symmetric=True, scale_method="absmax")
  path = str(tmp_path / "rules.json")
  qwix_export.write_rules(path, args)
  return np.asarray(qwix_export.ptq_apply(fmodel, fvars, qwix_export.load_rules(path), x))


@pytest.mark.parametrize("bits", qwix_export.QWIX_BITS)
def test_qwix_ptq_is_baqs_round_to_nearest_at_every_supported_width(bits, tmp_path):
  captured, fmodel, fvars, x, want = _baq("small_cnn", {"Dense_0": bits, "head": 8},
                                          widths=(8, 16), hidden=16)
  got = _qwix_logits(captured, fmodel, fvars, x, tmp_path)
  float_logits = np.asarray(apply_model(fmodel, fvars, x))
  assert np.max(np.abs(float_logits - want)) > 1e-3  # the quantization is visible
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_vision_transformers_dense_layers_map_layer_by_layer(tmp_path):
  """DeiT-Tiny (one block) with every Dense layer at its own bit-width."""
  bits = {r"blocks_0/attn/(qkv|proj)": 4, r"blocks_0/mlp/fc1": 3, r"blocks_0/mlp/fc2": 6,
          r"head": 8}
  captured, fmodel, fvars, x, want = _baq("deit_tiny", bits, size=32, depth=1, img_size=32,
                                          patch_size=16)
  assert len(captured) == 5, sorted(captured)
  got = _qwix_logits(captured, fmodel, fvars, x, tmp_path)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,match", [
    ("conv", "Conv_0: a convolution"),
    ("per_layer", "one scale per tensor"),
    ("mse", "scale method 'mse'"),
    ("sixteen", "16 bits: Qwix's integer types are int2"),
    ("mixed", "channels at different bit-widths"),
])
def test_what_qwix_cannot_express_is_refused_with_the_reason(case, match):
  layer = {"conv": "Conv_0"}.get(case, "Dense_0")
  kw = dict(granularity="layer" if case == "per_layer" else "channel",
            scale_method="mse" if case == "mse" else "absmax")
  captured, *_ = _baq("small_cnn", {layer: 4}, widths=(8, 16), hidden=16, **kw)
  if case == "sixteen":  # e.g. a uniform16 baseline
    captured["Dense_0"]["bits"] = np.full(16, 16.0)
  if case == "mixed":
    captured["Dense_0"]["bits"] = np.array([3] * 8 + [5] * 8)
  with pytest.raises(ValueError, match=match):
    qwix_export.rules(captured, symmetric=True, scale_method=kw["scale_method"])


def test_rules_file_round_trips(tmp_path):
  captured, *_ = _baq("small_cnn", {"Dense_0": 3, "head": 5}, widths=(8, 16), hidden=16)
  args = qwix_export.rules(captured, symmetric=True, scale_method="absmax")
  path = str(tmp_path / "r.json")
  qwix_export.write_rules(path, args)
  loaded = qwix_export.load_rules(path)
  assert [(r.module_path, r.weight_qtype) for r in loaded] == [("Dense_0", "int3"),
                                                               ("head", "int5")]
  assert loaded[0].weight_calibration_method == "absmax,1.1666666666666667"  # 3.5 / 3
