"""The bi-level bit search: weights step on the training batch, bits on the held-out batch."""

import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from baq.data.pipeline import Batcher
from baq.quant import units
from baq.quant.inject import BITS_LEAF
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
