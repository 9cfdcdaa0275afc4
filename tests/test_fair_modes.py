"""fair_static / fair_static_qat / allocation-initialised BAQ, and the
group-weighted loss, through the real trainer on the tiny config."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.experiment import job as experiment
from baq.train import loop as trainer
from baq.train.checkpoint import restore_params
from baq.quant import units
from baq.train.step import make_train_step


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_config, tiny_float_run):
  """fair_static and fair_static_qat, fine-tuned from the session's float model."""
  workdir = str(tmp_path_factory.mktemp("fair"))
  c = make_tiny_config(init_checkpoint=tiny_float_run)
  c.mode = "fair_static,fair_static_qat"
  c.baselines = "uniform4"
  c.importance.calib_per_group = 12
  c.importance.num_probes = 8
  c.importance.measure = "hessian"
  c.importance.reducer = "cvar"
  c.importance.reducer_kwargs = dict(alpha=0.5)
  return c, workdir, experiment.run(c, workdir)


def test_plan_is_what_both_modes_deploy(run):
  config, workdir, report = run
  plan = json.load(open(os.path.join(workdir, "allocation_plan.json")))
  numel, bits = np.asarray(plan["numel"]), np.asarray(plan["bits"])
  assert (numel * bits).sum() <= config.quant.target_bits * numel.sum()
  assert set(bits.tolist()) <= set(config.importance.choices)
  for name in ("fair_static", "fair_static_qat"):
    m = report["methods"][name]
    assert m["avg_bits"] == pytest.approx((numel * bits).sum() / numel.sum())
    alloc = json.load(open(os.path.join(workdir, name, "bit_allocation.json")))
    deployed = [u["bits"] for u in alloc["units"]] if "units" in alloc else alloc["bits"]
    assert np.asarray(deployed).ravel().tolist() == bits.tolist()
  assert np.shape(plan["importance_per_group"]) == (6, len(bits))


def test_fair_static_is_post_training_and_qat_trains_the_weights(run):
  config, workdir, _ = run
  fp = restore_params(config.init_checkpoint)
  static = restore_params(os.path.join(workdir, "fair_static"))
  qat = restore_params(os.path.join(workdir, "fair_static_qat"))
  layers = units.find_units(static)
  plan = json.load(open(os.path.join(workdir, "allocation_plan.json")))
  for l in layers:
    k = l.kernel_path
    np.testing.assert_array_equal(_get(static, k), _get(fp, k))
    assert not np.array_equal(_get(qat, k), _get(fp, k))
  np.testing.assert_array_equal(units.gather_bits(qat, layers), plan["bits"])


def test_baq_can_start_from_the_allocation(run, tmp_path, tiny_data):
  config, workdir, _ = run
  config = config.copy_and_resolve_references()
  config.quant.init_from = "allocation"
  config.quant.finalize_fraction = 0.0
  fp = restore_params(config.init_checkpoint)
  plan = experiment.allocation_plan(config, workdir, fp, tiny_data)
  out = trainer.train(config, str(tmp_path / "baq"), mode="baq", data=tiny_data, steps=2,
                      lr=1e-4, init_params=fp, init_bits=plan)
  bits = np.asarray(units.gather_bits(out.params, units.find_units(out.params)))
  # Two Adam steps of bits_lr move each bit-width by at most ~2 * bits_lr.
  assert np.max(np.abs(bits - plan)) <= 2.2 * config.optim.bits_lr
  assert not np.allclose(bits, config.quant.target_bits)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def test_group_weights_balance_groups():
  groups = np.array([0] * 8 + [1] * 2)
  w = trainer.group_loss_weights("inverse_frequency", groups, 3)
  np.testing.assert_allclose(w[:2] * [8, 2], [5, 5])  # equal total weight per group
  assert w[2] == 0 and np.isclose((w[groups]).mean(), 1.0)
  assert trainer.group_loss_weights("none", groups, 3) is None
  with pytest.raises(ValueError, match="inverse_frequency"):
    trainer.group_loss_weights("inverse", groups, 3)


def test_weighted_task_loss_is_the_group_weighted_mean():
  from baq.models import build_model
  import optax
  model = build_model("small_cnn", 3, None, widths=(2,), hidden=0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8, 8, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]  # jitted: eager is op by op
  batch = {"image": x, "label": jnp.array([0, 1, 2, 0, 1, 2]), "group": jnp.array([0, 0, 0, 0, 1, 1])}
  weights = np.array([0.5, 2.0], np.float32)
  tx = optax.sgd(0.0)
  step = make_train_step(model, tx, {}, [], num_groups=2, budget=4.0, bit_bounds=(2, 8),
                         group_weights=weights)
  state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params),
               rng=jax.random.key_data(jax.random.key(0)), penalty_state={})
  _, metrics = step(state, batch)
  per_ex = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jax.jit(model.apply)({"params": params}, x), batch["label"]))
  w = weights[np.asarray(batch["group"])]
  np.testing.assert_allclose(metrics["task_loss"], (w * per_ex).sum() / w.sum(), rtol=1e-5)


def test_diagnostics_cover_every_model_and_group(run):
  from baq.experiment import diagnostics
  config, workdir, _ = run
  config = config.copy_and_resolve_references()
  config.diagnostics.update(dict(per_group=6, num_probes=8, probe_chunk=8, max_iters=5))
  out = diagnostics.diagnose_workdir(config, workdir)
  assert set(out["models"]) == {"fp32", "uniform4", "uniform4_ptq", "fair_static",
                                "fair_static_qat"}
  for m in out["models"].values():
    for stat in diagnostics.STATS + ("hessian_trace_stderr",):
      assert len(m[stat]) == 6 and np.all(np.isfinite(m[stat])), stat
    assert np.all(np.asarray(m["grad_norm"]) > 0)
  assert out["skew"]["worst_group"] == int(np.argmin(out["models"]["fp32"]["accuracy"]))
  for name in ("diagnostics.json", "diagnostics.png", "bits_vs_importance.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
