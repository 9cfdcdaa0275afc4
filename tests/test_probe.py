"""The probed sensitivity (`baq.train.probe`): BatchNorm recalibration, the probes'
partition, and the measurement on the tiny model."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from baq.quant import units
from baq.train import probe
from baq.train.checkpoint import restore_variables


class _Norms(nn.Module):
  """Two BatchNorms (momenta 0.9 and 0.5) around a fixed affine map."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = 2.0 * x + 1.0
    return nn.BatchNorm(use_running_average=not train, momentum=0.5, name="second")(x)


def test_recalibration_sets_the_running_statistics_to_the_batchs_whatever_the_momentum():
  x = jax.random.normal(jax.random.key(0), (256, 5)) * 3.0 + 2.0
  model = _Norms()
  v = model.init(jax.random.key(1), x)
  v = dict(v, batch_stats=jax.tree.map(lambda a: a + 7.0, v["batch_stats"]))  # stale
  got = probe.recalibrate_batchnorm(model, v, x)["batch_stats"]
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(got["BatchNorm_0"]["mean"], xs.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["BatchNorm_0"]["var"], xs.var(0), rtol=1e-4)
  # The second layer sees the first's batch-normalised output: mean 1, variance 4 x var/(var+eps).
  inner = 2.0 * (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5) + 1.0
  np.testing.assert_allclose(got["second"]["mean"], inner.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["second"]["var"], inner.var(0), rtol=1e-4)
  assert probe.recalibrate_batchnorm(model, {"params": v["params"]}, x) == {"params": v["params"]}


def _layers(*counts):
  return [units.LayerUnits(f"L{i}", ("b",), ("k",), c, 10) for i, c in enumerate(counts)]


def test_probes_are_units_alone_or_clusters_within_layers():
  assert [p.tolist() for p in probe.probes(_layers(1, 1, 1), 8)] == [[0], [1], [2]]
  ps = probe.probes(_layers(40, 8, 1), 12)
  flat = np.concatenate(ps)
  assert sorted(flat.tolist()) == list(range(49))  # every unit once
  bounds = np.cumsum([0, 40, 8, 1])
  for p in ps:  # contiguous, inside one layer
    assert np.all(np.diff(p) == 1) and np.searchsorted(bounds, p[0], "right") == \
        np.searchsorted(bounds, p[-1], "right")
  assert 3 <= len(ps) <= 12 and ps[-1].tolist() == [48]
  # With a score, a layer's clusters are runs of its channels in score order.
  score = np.random.default_rng(0).permutation(49).astype(float)
  ps = probe.probes(_layers(40, 8, 1), 12, score)
  assert sorted(np.concatenate(ps).tolist()) == list(range(49))
  first = sorted((p for p in ps if p.max() < 40), key=lambda p: score[p].min())
  assert len(first) > 1  # layer 0's clusters hold disjoint ranges of the score
  assert all(score[a].max() < score[b].min() for a, b in zip(first, first[1:]))


@pytest.fixture(scope="module")
def measured(make_tiny_config, tiny_data, tiny_float_run):
  c = make_tiny_config()
  c.seed = 0
  c.quant.granularity = "channel"
  fv = restore_variables(tiny_float_run)
  out = {mp: probe.measure(c, tiny_data, fv, steps=2, choices=(2, 4, 8), max_probes=mp,
                           per_group=8, recal_images=64)
         for mp in (4, 1000)}
  return c, fv, out


def test_the_highest_choice_costs_nothing_and_clusters_share_by_weights(measured):
  _, _, out = measured
  for mp, (a, seconds) in out.items():
    assert a.sensitivity.shape == (6, len(a.units), 3) and a.measure == "probed" and seconds > 0
    np.testing.assert_array_equal(a.sensitivity[:, :, 2], 0.0)  # exactly the baseline's run
    assert np.isfinite(a.sensitivity).all()
  clustered, alone = out[4][0], out[1000][0]
  # Units of one cluster carry its one measured cost in proportion to their weights.
  ratio = clustered.sensitivity[:, :, 0] / clustered.numel[None]
  groups_of_equal = [np.unique(np.round(r, 12)).size for r in ratio]
  assert max(groups_of_equal) < len(clustered.units)
  # Every unit probed alone: a per-unit table with more distinct costs than clusters.
  assert np.unique(np.round(alone.sensitivity[0, :, 0], 12)).size > max(groups_of_equal)


def test_probing_is_deterministic_and_refuses_the_test_split(measured, tiny_data):
  c, fv, out = measured
  again, _ = probe.measure(c, tiny_data, fv, steps=2, choices=(2, 4, 8), max_probes=4,
                           per_group=8, recal_images=64)
  np.testing.assert_array_equal(again.sensitivity, out[4][0].sensitivity)
  with pytest.raises(ValueError, match="test split"):
    probe.measure(c, tiny_data, fv, steps=1, choices=(2, 8), heldout="test")
