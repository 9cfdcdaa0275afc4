"""The bi-level bit search: weights step on the training batch, bits on the held-out batch."""

from typing import Optional

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.allocation import projection
from baq.data.pipeline import Batcher
from baq.quant import units
from baq.quant.inject import BITS_LEAF, Dense, Quantizer
from baq.train import bilevel
from baq.train.state import create_train_state
from baq.train.step import make_bilevel_step, make_train_step


@pytest.fixture(scope="module")
def setup(make_tiny_config, tiny_data):
  c = make_tiny_config(**{"quant.parametrization": "fracbits", "quant.search_steps": 4})
  split = tiny_data["train"]
  s = create_train_state(c, "baq", num_classes=split.num_classes, num_groups=split.num_groups,
                         image_shape=split.images.shape[1:], steps=4, lr=1e-3)
  batcher = Batcher(split, c.batch_size, seed=0)
  return c, s, batcher(0), batcher(1)


def _steps(s, split_groups):
  kw = dict(num_groups=split_groups, budget=s.budget)
  bilevel_step = jax.jit(make_bilevel_step(s.model, s.tx, s.penalties, s.layers,
                                           bit_bounds=(2.0, 8.0), **kw))
  plain = jax.jit(make_train_step(s.model, s.tx, s.penalties, s.layers, bit_bounds=(2.0, 8.0),
                                  **kw))
  return bilevel_step, plain


def _split_leaves(params):
  flat = tu.flatten_dict(dict(params))
  return ({k: v for k, v in flat.items() if k[-1] != BITS_LEAF},
          {k: v for k, v in flat.items() if k[-1] == BITS_LEAF})


def test_with_one_batch_it_is_the_ordinary_step(setup, tiny_data):
  _, s, a, _ = setup
  bilevel_step, plain = _steps(s, tiny_data["train"].num_groups)
  got, _ = bilevel_step(s.state, a, a)
  want, _ = plain(s.state, a)
  jax.tree.map(np.testing.assert_array_equal, got["params"], want["params"])


def test_weights_follow_the_training_batch_and_bits_the_heldout_batch(setup, tiny_data):
  _, s, a, b = setup
  bilevel_step, plain = _steps(s, tiny_data["train"].num_groups)
  got, m = bilevel_step(s.state, a, b)
  on_a, _ = plain(s.state, a)
  on_b, _ = plain(s.state, b)
  gw, gb = _split_leaves(got["params"])
  aw, _ = _split_leaves(on_a["params"])
  _, bb = _split_leaves(on_b["params"])
  for k in gw:
    np.testing.assert_allclose(gw[k], aw[k], rtol=1e-6, atol=1e-7)
  for k in gb:
    np.testing.assert_allclose(gb[k], bb[k], rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(gb[k], _split_leaves(on_a["params"])[1][k]) for k in gb)
  jax.tree.map(np.testing.assert_array_equal, got["batch_stats"], on_a["batch_stats"])
  assert np.isfinite(float(m["heldout_loss"]))


def test_the_search_meets_the_budget_saves_and_refuses_the_test_split(setup, tiny_data, tmp_path,
                                                                   tiny_float_run):
  from baq.train.checkpoint import restore_variables
  c, _, _, _ = setup
  fv = restore_variables(tiny_float_run)
  path = str(tmp_path / "search.msgpack")
  found = bilevel.search(c, tiny_data, fv, steps=4, init_bits=None, path=path)
  numel = np.array([n for n in units.unit_numels(units.find_units(found["variables"]["params"]))])
  assert (numel * found["bits"]).sum() <= c.quant.target_bits * numel.sum() + 1e-9
  assert found["learned"].shape == found["bits"].shape and found["steps"] == 4
  again = bilevel.search(c, tiny_data, fv, steps=4, init_bits=None, path=path)
  np.testing.assert_array_equal(again["bits"], found["bits"])
  with pytest.raises(ValueError, match="test split"):
    bilevel.search(c, tiny_data, fv, steps=1, init_bits=None, heldout="test")


class _Planted(nn.Module):
  """Two bias-free dense units: A reads features 0-1, B features 2-3 (see the test)."""
  num_classes: int
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x, train=False):
    del train
    a = Dense(self.quant)(2, use_bias=False, name="A")(x[:, :2])
    return a + Dense(self.quant)(2, use_bias=False, name="B")(x[:, 2:])


def test_a_unit_that_destroys_a_heldout_group_learns_the_most_bits(make_tiny_config):
  """A planted pair of units: groups 0 and 1 read only unit A, whose weights are on every
  grid (no bit changes its output); group 2 reads only unit B, whose outlier rounds its
  small, discriminative weights to zero at low bits. The training batch holds groups 0
  and 1 only, the held-out batch all three. The bits must learn from the held-out batch:
  B's rise above A's, and the exact allocation gives B the most. With the training batch
  as the held-out one too, no task gradient reaches either unit's bits: both stay."""
  from baq import models
  name = "planted_bilevel"
  models.register_model(name)(lambda num_classes, quant=None, **kw: _Planted(num_classes,
                                                                              quant))
  try:
    c = make_tiny_config(**{"quant.parametrization": "fracbits", "quant.granularity": "layer",
                            "quant.target_bits": 3.0})
    c.model.name, c.model.kwargs = name, {}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    groups = np.repeat(np.arange(3), 32).astype(np.int32)
    x[groups < 2, 2:] = 0.0
    x[groups == 2, :2] = 0.0
    a = np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32)
    b = np.array([[0.3, -0.3], [-0.3, 2.0]], np.float32)
    labels = (x[:, :2] @ a + x[:, 2:] @ b).argmax(1).astype(np.int32)
    batch = lambda m: {"image": jnp.asarray(x[m]), "label": jnp.asarray(labels[m]),  # noqa: E731
                       "group": jnp.asarray(groups[m])}
    s = create_train_state(c, "baq", num_classes=2, num_groups=3, image_shape=(4,), steps=60,
                           lr=1e-4, init_variables={"A": {"kernel": a}, "B": {"kernel": b}})
    assert not s.state.get("batch_stats")
    step = jax.jit(make_bilevel_step(s.model, s.tx, s.penalties, s.layers, num_groups=3,
                                     budget=s.budget, bit_bounds=(2.0, 8.0)))
    train = batch(groups < 2)

    def search(held):
      state = s.state
      for _ in range(60):
        state, _ = step(state, train, held)
      return np.asarray(units.gather_bits(state["params"], s.layers))

    start = np.asarray(units.gather_bits(s.state["params"], s.layers))
    learned = search(batch(np.ones(96, bool)))
    assert start[0] == start[1] and learned[1] > learned[0] + 0.5, (start, learned)
    np.testing.assert_allclose(search(train), start, atol=1e-3)
    bits = projection.nearest(learned.astype(np.float64), units.unit_numels(s.layers),
                              s.budget, 2, 8, spend=True)
    assert bits[1] > bits[0], bits
  finally:
    models.MODELS.unregister(name)
