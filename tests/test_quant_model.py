"""Quantization injected into a model: rules, bit gradients, budget, export."""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.models import build_model
from baq.allocation import projection
from baq.export import allocation as alloc_export
from baq.export import packed as export
from baq.quant import units
from baq.quant.inject import QuantMode, Quantizer, QuantSpec
from baq.fairness import losses


def _setup(parametrization="fracbits", granularity="channel", init_bits=4.5, rules=None,
           act_bits=None):
  spec = QuantSpec(init_bits=init_bits, parametrization=parametrization,
                   granularity=granularity, act_bits=act_bits)
  q = Quantizer(rules or ((".*", spec),))
  model = build_model("small_cnn", 3, q, widths=(8, 16), hidden=16)
  x = jax.random.normal(jax.random.key(0), (32, 12, 12, 3))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  rngs = {"params": jax.random.key(2), "quant": jax.random.key(3)}
  params = jax.jit(model.init)(rngs, x)["params"]  # jitted: eager compiles op by op
  return model, params, x, y


@pytest.mark.parametrize("parametrization", ["fracbits", "diffq"])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("init_bits", [4.0, 4.5])
def test_task_loss_alone_gives_every_bit_a_gradient(parametrization, granularity, init_bits):
  """The public FairQuant code cuts this gradient; baq must not.

  At initialisation about a third of Dense_0's ReLUs are dead for every input
  (their inputs are non-negative pooled features), and a dead unit's weights
  cannot move the loss, so neither can its bit-width. Dense_0's bias is
  raised so that every unit is live (checked: every unit's kernel gets a
  gradient); then every single bit-width must get one.
  """
  model, params, x, y = _setup(parametrization, granularity, init_bits)
  params = dict(params, Dense_0=dict(params["Dense_0"],
                                     bias=jnp.full_like(params["Dense_0"]["bias"], 0.5)))
  layers = units.find_units(params)

  def task_loss(p):
    logits = model.apply({"params": p}, x, rngs={"quant": jax.random.key(5)})
    return jnp.mean(losses.cross_entropy(logits, y))

  grads = jax.jit(jax.grad(task_loss))(params)
  g = np.asarray(units.gather_bits(grads, layers))
  flat = tu.flatten_dict(grads)
  live = np.concatenate([np.abs(np.asarray(flat[l.kernel_path])).reshape(-1, l.count).sum(0) > 0
                         for l in layers])
  assert g.shape == live.shape == (units.unit_numels(layers).shape[0],)
  assert g.shape[0] == (43 if granularity == "channel" else 4)  # 8 + 16 + 16 + 3 channels
  assert live.all(), f"units without a weight gradient: {np.nonzero(~live)[0]}"
  assert np.all(g != 0) and np.all(np.isfinite(g)), f"zero bit gradients at {np.nonzero(g == 0)[0]}"


def test_rules_first_match_wins_and_none_keeps_float():
  rules = (("head", None), ("Conv_0", QuantSpec(granularity="layer", init_bits=8)),
           (".*", QuantSpec(init_bits=3)))
  model, params, x, _ = _setup(rules=rules)
  layers = {l.name: l for l in units.find_units(params)}
  assert set(layers) == {"Conv_0", "Conv_1", "Dense_0"}
  assert layers["Conv_0"].count == 1 and layers["Conv_1"].count == 16
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  assert not any("head" in jax.tree_util.keystr(k) and "bits" in jax.tree_util.keystr(k)
                 for k in flat)


def test_no_quantizer_is_the_float_model():
  model, params, x, _ = _setup(init_bits=8)
  fmodel = build_model("small_cnn", 3, None, widths=(8, 16), hidden=16)
  fparams = export.dequantized_params(params, {})
  f = fmodel.apply({"params": fparams}, x)
  q = model.clone(quant=model.quant.replace(mode=QuantMode.EVAL)).apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(f - q))) > 0  # 8-bit differs from float...
  np.testing.assert_allclose(f, q, atol=0.05)  # ...but only slightly



def test_modes_train_eval_convert_serve():
  """EVAL rounds the bits; CONVERT is EVAL plus the codes; SERVE has no `bits`
  leaf; the old boolean switches are no longer accepted."""
  model, params, x, _ = _setup(init_bits=4.5, parametrization="fracbits")
  run = lambda mode, **kw: model.clone(quant=model.quant.replace(mode=mode)).apply(
      {"params": params}, x, **kw)
  train, ev = run(QuantMode.TRAIN), run(QuantMode.EVAL)
  assert float(jnp.max(jnp.abs(train - ev))) > 1e-4  # 4.5 bits interpolated vs rounded
  conv, state = run(QuantMode.CONVERT, mutable=["quant_export"])
  np.testing.assert_array_equal(conv, ev)
  bits = [v for k, v in tu.flatten_dict(state["quant_export"]).items() if k[-1] == "bits"]
  assert len(bits) == 4 and all(np.all(np.asarray(b) == 4.0) for b in bits)  # round half even
  serve = model.clone(quant=model.quant.replace(mode=QuantMode.SERVE))
  assert not any("bits" in k for k in tu.flatten_dict(serve.init(jax.random.key(0), x)["params"]))
  with pytest.raises(TypeError):
    Quantizer(model.quant.rules, mode=False)
  with pytest.raises(TypeError):
    Quantizer(model.quant.rules, training=False)  # pylint: disable=unexpected-keyword-arg

def test_average_bits_and_size_are_weighted_by_weight_count():
  model, params, _, _ = _setup(init_bits=4.0)
  layers = units.find_units(params)
  numel = units.unit_numels(layers)
  bits = np.arange(len(numel)) % 5 + 2.0
  p2 = units.scatter_bits(params, layers, bits)
  np.testing.assert_allclose(units.average_bits(p2, layers), (numel * bits).sum() / numel.sum(),
                             rtol=1e-6)
  size4 = units.model_bytes(params, layers)
  size8 = units.model_bytes(units.scatter_bits(params, layers, np.full(len(numel), 8.0)), layers)
  np.testing.assert_allclose(size8 - size4, numel.sum() * 4 / 8, rtol=1e-6)
  t = units.bits_for_bytes(params, layers, float(size4))
  np.testing.assert_allclose(t, 4.0, rtol=1e-5)


def test_size_counts_scales_zero_points_and_batchnorm_statistics():
  """model_bytes by hand: codes, a scale (and a zero point) per unit, the rest in float32."""
  kernel = np.zeros((3, 3, 2, 5), np.float32)  # 5 output channels: 5 units of 18 weights
  params = {"conv": {"kernel": kernel, "bias": np.zeros(5, np.float32),
                     "QuantConv_0": {"bits": np.full(5, 4.0, np.float32)}},
            "bn": {"scale": np.ones(5, np.float32), "bias": np.zeros(5, np.float32)}}
  stats = {"bn": {"mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)}}
  layers = units.find_units(params)
  assert [(l.count, l.numel) for l in layers] == [(5, 18)]
  codes, others = 90 * 4 / 8, 4 * (5 + 10)  # 4-bit codes; conv bias, bn scale and bias
  assert units.model_bytes(params, layers) == codes + others + 4 * 5
  assert units.model_bytes(params, layers, symmetric=False) == codes + others + 8 * 5
  assert units.model_bytes(params, layers, batch_stats=stats) == codes + others + 4 * 5 + 4 * 10
  # A size budget counts the same things.
  size = units.model_bytes(params, layers, symmetric=False, batch_stats=stats)
  assert units.bits_for_bytes(params, layers, size, symmetric=False,
                              batch_stats=stats) == pytest.approx(4.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip(symmetric):
  rng = np.random.default_rng(0)
  bits = rng.integers(2, 9, 7)
  lo = -(2 ** (bits - 1) - 1) if symmetric else np.zeros_like(bits)
  hi = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
  codes = rng.integers(lo, hi + 1, (3, 5, 7))
  packed = export.pack(codes.astype(np.float32), bits, symmetric)
  np.testing.assert_array_equal(export.unpack(packed, symmetric), codes)
  data_bytes = sum(v.nbytes for k, v in packed.items() if k.endswith("_data"))
  assert data_bytes <= int(np.ceil((15 * bits).sum() / 8)) + 8


@pytest.mark.parametrize("granularity,act_bits", [("channel", None), ("layer", None),
                                                  ("channel", 4)])
def test_exported_integer_weights_reproduce_fake_quant_logits(tmp_path, granularity, act_bits):
  model, params, x, _ = _setup(granularity=granularity, init_bits=4.7, act_bits=act_bits)
  layers = units.find_units(params)
  ints, deployed = projection.deploy(params, layers, 4.0, 2, 8)
  assert (units.unit_numels(layers) * ints).sum() / units.unit_numels(layers).sum() <= 4.0
  eval_model = model.clone(quant=model.quant.replace(mode=QuantMode.EVAL))
  want = eval_model.apply({"params": deployed}, x)
  captured = export.capture_codes(model, deployed, x[:1])
  path = str(tmp_path / "w.safetensors")
  export.save_packed(path, captured, symmetric=True)
  dq = export.dequantized_params(deployed, export.unpack_kernels(path))
  got = export.reference_model(model).apply({"params": dq}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  fmodel = build_model("small_cnn", 3, None, widths=(8, 16), hidden=16)
  if act_bits is None:  # Weight-only: the plain float model runs the export.
    np.testing.assert_allclose(fmodel.apply({"params": dq}, x), want, rtol=1e-5, atol=1e-5)
  else:  # Activations really are quantized.
    assert np.max(np.abs(fmodel.apply({"params": dq}, x) - want)) > 1e-3
  rec = alloc_export.allocation_record(params, deployed, layers, 4.0)
  assert rec["avg_bits"] <= 4.0 and len(rec["units"]) == len(ints)
