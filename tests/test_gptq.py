"""GPTQ / Fair-GPTQ: error vs round-to-nearest, grid, damping, patches, model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.study.bias import pairs
from baq.data.synthetic import generate as synthetic
from baq.data.pipeline import normalize
from baq.models.cnn import SmallCNN
from baq.quant import fake_quant as fq
from baq.quant import gptq
from baq.quant import hessian
from baq.ptq import sequential as gptq_model

D, M = 96, 32  # Random layers share one padded shape with the SmallCNN's.


def _correlated(n, d, seed, scale_spread=1.0):
  """Rows with a random covariance and uneven input scales, like activations."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  x = rng.normal(size=(n, d)) @ mix + 0.3 * rng.normal(size=(n, d))
  return (x * rng.lognormal(0.0, scale_spread, size=d)).astype(np.float32)


def _layer(seed=0, n=1024):
  x = _correlated(n, D, seed)
  w = (np.random.default_rng(seed + 1).normal(size=(D, M)) * 0.1).astype(np.float32)
  return x, w, hessian.update_stats(hessian.init_stats(D), x)


def _init(module, x, seed=0):
  """Lecun-normal-like numpy params: `module.init` compiles truncated_normal,
  which costs seconds per shape on a loaded CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)

  def fill(path, leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    if path[-1].key == "var":
      return jnp.ones(leaf.shape, leaf.dtype)
    std = 1.0 / np.sqrt(fan_in) if path[-1].key == "kernel" else 0.1
    return jnp.asarray(rng.normal(size=leaf.shape) * std, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _err(x, w, w_q):
  return float(np.sum((x @ (w - np.asarray(w_q))) ** 2))


def _scale_rows(r, group):
  """Per-row scales [d, m] of a GPTQResult."""
  s = np.asarray(r.scales)
  return np.broadcast_to(s, r.codes.shape) if s.ndim == 1 else np.repeat(s, group, 0)


# As baq deploys it: jitted, per-channel bits.
_fake_quant = jax.jit(functools.partial(fq.fake_quant, channel_axis=-1))


def _on_grid(w_q, bits, group):
  """fake_quant leaves every group of rows unchanged."""
  bv = jnp.broadcast_to(jnp.asarray(bits, jnp.float32), w_q.shape[-1:])
  w_q = np.asarray(w_q)
  return all(np.array_equal(np.asarray(_fake_quant(w_q[i:i + group], bv)), w_q[i:i + group])
             for i in range(0, w_q.shape[0], group))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order,group", [(False, None), (True, None), (False, 32),
                                             (True, 32)])
def test_gptq_beats_rtn_and_lies_on_the_grid(bits, act_order, group):
  x, w, stats = _layer()
  r = gptq.gptq(w, hessian.hessian(stats), bits, act_order=act_order, group_size=group)
  e_gptq, e_rtn = _err(x, w, r.weight), _err(x, w, gptq.rtn(w, bits, group))
  # Measured ratios 0.43-0.67, act_order lowest.
  assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
  assert np.isclose(gptq.output_error(stats.xtx, w, r.weight), e_gptq, rtol=1e-3)
  qmax = 2 ** (bits - 1) - 1
  assert np.abs(np.asarray(r.codes)).max() == qmax
  rows = _scale_rows(r, group)
  assert np.array_equal(np.asarray(r.codes, np.float32) * rows, np.asarray(r.weight))
  assert r.scales.shape == ((M,) if group is None else (D // group, M))
  assert _on_grid(r.weight, bits, group or D)


def test_rtn_is_fake_quant():
  _, w, _ = _layer()
  bv = jnp.full((M,), 3.0)
  assert np.array_equal(np.asarray(gptq.rtn(w, 3)),
                        np.asarray(_fake_quant(w, bv)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_grid_rtn_is_gptqs_grid_and_beats_the_restricted_one(bits):
  """The full grid: scale 2 absmax / (2^b - 1), codes clip(round(w / s), -2^(b-1), 2^(b-1) - 1)."""
  _, w, _ = _layer()
  r = gptq.round_to_nearest(w, bits, grid="full")
  s = 2 * np.abs(w).max(0) / (2 ** bits - 1)
  want = np.clip(np.round(w / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  np.testing.assert_array_equal(np.asarray(r.codes), want)
  np.testing.assert_allclose(np.asarray(r.scales), s, rtol=1e-6)
  assert np.array_equal(np.asarray(r.weight),
                        np.asarray(r.codes, np.float32) * np.asarray(r.scales))
  assert np.asarray(r.codes).min() == -2 ** (bits - 1)  # the level the restricted grid lacks
  finer = np.sum((w - np.asarray(r.weight)) ** 2)
  assert finer < np.sum((w - np.asarray(gptq.rtn(w, bits))) ** 2)
  with pytest.raises(ValueError, match="grid must be one of restricted, full"):
    gptq.rtn(w, bits, grid="wide")


@pytest.mark.parametrize("grid", ["restricted", "full"])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(grid):
  """Uncorrelated inputs: no error feeds back to other rows, so GPTQ rounds each
  weight to nearest, on either grid."""
  _, w, _ = _layer()
  h = np.diag(np.random.default_rng(3).uniform(0.5, 2.0, D)).astype(np.float32)
  for bits in (3, 4):
    r = gptq.gptq(w, h, bits, percdamp=0.0, grid=grid)
    np.testing.assert_array_equal(np.asarray(r.codes),
                                  np.asarray(gptq.round_to_nearest(w, bits, grid=grid).codes))


def test_full_grid_gptq_lies_on_its_grid_and_beats_rtn():
  x, w, stats = _layer()
  for group in (None, 32):
    r = gptq.gptq(w, hessian.hessian(stats), 3, group_size=group, grid="full")
    codes = np.asarray(r.codes)
    assert codes.min() >= -4 and codes.max() <= 3 and codes.min() == -4
    assert np.array_equal(codes.astype(np.float32) * _scale_rows(r, group), np.asarray(r.weight))
    assert _err(x, w, r.weight) < 0.8 * _err(x, w, gptq.rtn(w, 3, group, grid="full"))


def test_fair_with_alpha_zero_is_gptq_bitwise():
  x, w, stats = _layer()
  xa, xb = _correlated(256, D, 5), _correlated(256, D, 6)
  h_pair = hessian.hessian(hessian.update_stats(hessian.init_stats(D), xa - xb))
  h = hessian.hessian(stats)
  plain = gptq.gptq(w, h, 3, act_order=True)
  fair = gptq.gptq(w, hessian.fair_hessian(h, h_pair, 0.0), 3, act_order=True)
  for a, b in zip(plain[:3], fair[:3]):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert plain.loss == fair.loss
  assert not np.array_equal(np.asarray(gptq.gptq(w, hessian.fair_hessian(h, h_pair, 1.0), 3,
                                              act_order=True).weight),
                            np.asarray(plain.weight))


def test_fair_term_moves_pair_differences_toward_float():
  """Pairs differ along inputs that the calibration set barely excites."""
  x, w, stats = _layer()
  rng = np.random.default_rng(7)
  xa = _correlated(256, D, 8)
  xb = xa.copy()
  xb[:, :24] += 3.0 * rng.normal(size=(256, 24)).astype(np.float32)
  h, h_pair = hessian.hessian(stats), hessian.hessian(hessian.update_stats(hessian.init_stats(D), xa - xb))
  pair_err, task_err = [], []
  for alpha in (0.0, 0.3, 3.0):
    w_q = gptq.gptq(w, hessian.fair_hessian(h, h_pair, alpha), 3).weight
    pair_err.append(_err(xa - xb, w, w_q))
    task_err.append(_err(x, w, w_q))
  # Measured pair errors 2448, 1144, 1116 (RTN: 1167: plain GPTQ pushes its
  # error into the directions calibration never excites); task error 7982,
  # 8225, 8549 (RTN: 13914).
  assert pair_err[2] < pair_err[1] < 0.7 * pair_err[0], pair_err
  assert task_err[0] < task_err[2] < 0.8 * _err(x, w, gptq.rtn(w, 3)), task_err


def test_failed_cholesky_raises_damping_with_a_warning():
  x = _correlated(20, D, 3)  # 20 rows: H has rank 20 of 96.
  x[:, 5] = 0.0              # and one dead input.
  h = np.asarray(hessian.hessian(hessian.update_stats(hessian.init_stats(D), x)))
  mean = np.trace(h) / D
  h_bad = h - 1e-3 * mean * np.eye(D, dtype=np.float32)  # slightly indefinite
  h_bad[5, :] = h_bad[:, 5] = 0.0
  _, w, _ = _layer()
  with pytest.warns(UserWarning, match=r"GPTQ fc: Cholesky .* damping") as record:
    r = gptq.gptq(w, h_bad, 4, percdamp=1e-5, name="fc")
  assert len(record) >= 2 and r.damp >= 1e-3 * mean
  assert np.isfinite(np.asarray(r.weight)).all() and _on_grid(r.weight, 4, D)
  assert np.all(np.asarray(r.weight)[5] == 0.0)
  with pytest.raises(FloatingPointError, match="GPTQ fc"), pytest.warns(UserWarning):
    gptq.gptq(w, np.full((D, D), np.nan, np.float32), 4, max_tries=2, name="fc")


@pytest.mark.parametrize("kw", [
    dict(features=6, kernel_size=(3, 3), strides=2, padding=((1, 0), (2, 1))),
    dict(features=6, kernel_size=(2, 3), padding=1, kernel_dilation=2,
         input_dilation=(1, 2)),
    dict(features=6, kernel_size=(3, 3), padding="VALID", feature_group_count=2),
])
def test_patches_times_kernel_is_the_convolution(kw):
  x = np.random.default_rng(0).normal(size=(2, 9, 8, 4)).astype(np.float32)
  conv = nn.Conv(use_bias=False, **kw)
  params = _init(conv, x)["params"]
  spec = gptq_model._spec(conv, "c", 1)
  rows = jax.jit(gptq_model.layer_rows, static_argnums=(1, 2))(x, spec, 4)
  k = params["kernel"]
  groups = spec.groups
  og = k.shape[-1] // groups
  out = jnp.concatenate([rows[g] @ k[..., g * og:(g + 1) * og].reshape(-1, og)
                         for g in range(groups)], axis=-1)
  ref = jax.jit(conv.apply)({"params": params}, x)
  np.testing.assert_allclose(out.reshape(ref.shape), ref, atol=2e-5)


@pytest.fixture(scope="module")
def cnn():
  data = synthetic.generate(128, seed=0, image_size=16)
  x = normalize(data["image"])
  # Every kernel has at most 128 rows and 32 columns: one compiled GPTQ program.
  model = SmallCNN(num_classes=3, widths=(8, 12, 16), hidden=16)
  variables = _init(model, x[:2])
  return model, variables, x


def test_gptq_beats_rtn_on_a_real_conv_layer(cnn):
  model, variables, x = cnn
  spec = next(s for s in gptq_model.find_layers(model, variables, x) if s.path == "Conv_1")
  w = np.asarray(variables["params"]["Conv_1"]["kernel"]).reshape(72, 12)
  xtx, n = gptq_model._layer_gram(model, variables, x, spec, 72, 64, None)
  h = hessian.hessian(hessian.HessianStats(xtx[0], n))
  e_rtn = gptq.output_error(xtx[0], w, gptq.rtn(w, 3))
  e_gptq = gptq.output_error(xtx[0], w, gptq.gptq(w, h, 3, act_order=True).weight)
  assert e_gptq < 0.5 * e_rtn, (e_gptq, e_rtn)


def test_sequential_model_quantization(cnn):
  model, variables, x = cnn
  bits = {"Conv_0": 4, "Dense_0": np.array([3, 4] * 8)}
  p_gptq, rec = gptq_model.quantize_model(model, variables, x, bits=bits, default_bits=3,
                                  batch_size=64)
  p_rtn, rec_rtn = gptq_model.quantize_model(model, variables, x, bits=bits, default_bits=3,
                                     batch_size=64, method="rtn")
  layers = ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "head"]
  assert list(rec) == layers
  for name in layers:
    k, k_float = p_gptq[name]["kernel"], variables["params"][name]["kernel"]
    assert not np.array_equal(np.asarray(k), np.asarray(k_float)), name
    assert _on_grid(np.asarray(k).reshape(-1, k.shape[-1]), bits.get(name, 3), k.size)
    codes = rec[name]["codes"].reshape(k.shape).astype(np.float32)
    assert np.array_equal(codes * rec[name]["scales"],
                          np.asarray(k))
    # Every layer beats RTN on its own (GPTQ-prefix) inputs; measured 0.04-0.22.
    assert rec[name]["err"] < 0.5 * rec[name]["err_rtn"], (name, rec[name])
  apply = jax.jit(model.apply)
  ref = apply(variables, x)
  out_gptq, out_rtn = apply({"params": p_gptq}, x), apply({"params": p_rtn}, x)
  assert np.isfinite(np.asarray(out_gptq)).all()
  mse_gptq = float(jnp.mean((out_gptq - ref) ** 2))
  mse_rtn = float(jnp.mean((out_rtn - ref) ** 2))
  assert mse_gptq < 0.2 * mse_rtn, (mse_gptq, mse_rtn)  # measured 3.6e-4 vs 1.7e-2


def test_fair_layers_float_layers_and_counterfactual_pairs(cnn):
  model, variables, x = cnn
  cf = synthetic.counterfactuals(synthetic.sample_lesions(64, np.random.default_rng(1)),
                                 (0, 5), image_size=16)
  pairs = (normalize(cf["image"][0]), normalize(cf["image"][1]))
  kw = dict(bits=3, batch_size=64, float_layers="head", fair_layers="Conv_.*",
            pairs=pairs)
  p0, rec0 = gptq_model.quantize_model(model, variables, x, alpha=0.0, **kw)
  p_plain, _ = gptq_model.quantize_model(model, variables, x, bits=3, batch_size=64,
                                 float_layers=["head"])
  assert jax.tree.all(jax.tree.map(np.array_equal, p0, p_plain))  # alpha 0: GPTQ
  p1, rec1 = gptq_model.quantize_model(model, variables, x, alpha=3.0, **kw)
  assert "head" not in rec1
  assert np.array_equal(p1["head"]["kernel"], variables["params"]["head"]["kernel"])
  assert [k for k, r in rec1.items() if r["fair"]] == ["Conv_0", "Conv_1", "Conv_2"]
  for name in ("Conv_0", "Conv_1", "Conv_2"):
    assert rec1[name]["pair_err"] < 0.5 * rec1[name]["pair_err_rtn"], rec1[name]
  # Conv_0 sees the images themselves under both runs: the Fair term trades
  # a little calibration error for a smaller pair-difference error.
  assert not rec0["Conv_0"]["fair"] and rec0["Conv_0"]["pairs"] == 64 * 16 * 16
  assert rec1["Conv_0"]["pair_err"] < 0.9 * rec0["Conv_0"]["pair_err"]  # 0.85


def test_bad_bits_raise(cnn):
  model, variables, x = cnn
  _, w, stats = _layer()
  with pytest.raises(ValueError, match="integer bits >= 2"):
    gptq.gptq(w, hessian.hessian(stats), 3.5)
  with pytest.raises(ValueError, match=r"unknown layers \['Conv_9'\]"):
    gptq_model.quantize_model(model, variables, x, bits={"Conv_9": 4})


class _Mixed(nn.Module):
  """Strided conv + BatchNorm, a grouped conv, and a Dense on tokens called twice."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), strides=2, padding=1)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(8, (3, 3), feature_group_count=4, name="grouped")(x)
    t = x.reshape(x.shape[0], -1, 8)
    shared = nn.Dense(8, name="shared")
    t = t + shared(nn.relu(shared(t)))
    return nn.Dense(3, name="head")(jnp.mean(t, axis=1))


def test_other_architectures_grouped_conv_tokens_shared_layer_batchnorm():
  x = normalize(synthetic.generate(32, seed=2, image_size=8)["image"])
  model = _Mixed()
  variables = _init(model, x[:2])
  layers = gptq_model.find_layers(model, variables, x, dict(train=False))
  assert [(s.path, s.calls, s.groups) for s in layers] == [
      ("Conv_0", 1, 1), ("grouped", 1, 4), ("shared", 2, 1), ("head", 1, 1)]
  params, rec = gptq_model.quantize_model(model, variables, x, bits=3, batch_size=16,
                                  apply_kwargs=dict(train=False))
  assert rec["shared"]["rows"] == 2 * 32 * 16  # both calls, every token
  assert rec["grouped"]["codes"].shape == (9 * 2, 8)
  for name in rec:  # A grouped conv's output channel still owns one kernel column.
    k = np.asarray(params[name]["kernel"])
    assert _on_grid(k.reshape(-1, k.shape[-1]), 3, k.size), name
    assert rec[name]["err"] < rec[name]["err_rtn"], (name, rec[name])
  out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
  assert np.isfinite(np.asarray(out)).all()


def test_match_pairs_nearest_same_label_without_replacement():
  feats = np.array([0.0, 10.0, 5.0, 9.0, 1.0, 100.0, 2.0, 50.0])[:, None]
  labels = np.array([0, 0, 1, 0, 0, 0, 1, 2])
  groups = np.array([0, 0, 0, 1, 1, 1, 1, 0])
  ia, ib = pairs.match_pairs(feats, labels, groups, group_a=0, group_b=1)
  # 0 -> 4 (|0-1|), 1 -> 3 (|10-9|), 2 -> 6 (label 1); 7 has no label-2 partner.
  assert ia.tolist() == [0, 1, 2] and ib.tolist() == [4, 3, 6]
  ia, ib = pairs.match_pairs(feats, labels, groups, group_a=1, group_b=0)
  assert sorted(zip(ia.tolist(), ib.tolist())) == [(3, 1), (4, 0), (6, 2)]
