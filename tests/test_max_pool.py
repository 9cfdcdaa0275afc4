"""baq.models.layers.max_pool against nn.max_pool: values, gradients, HVPs, bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.models.layers import max_pool


def _tied(shape, seed=0):
  """Non-negative inputs with many ties: values on a 0.1 grid, ReLU zeros, one flat window."""
  x = np.maximum(np.round(np.random.default_rng(seed).normal(size=shape), 1), 0)
  x[0, :4, :4] = 0.5
  return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("shape,window", [((4, 8, 8, 3), (2, 2)), ((3, 9, 7, 2), (2, 2)),
                                          ((2, 9, 9, 4), (3, 3)), ((2, 8, 6, 2), (2, 3))])
def test_values_and_gradient_are_nn_max_pools(shape, window):
  x = _tied(shape)
  ref = nn.max_pool(x, window, window)
  ct = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)
  grad = lambda pool: jax.grad(lambda v: (pool(v) * ct).sum())(x)  # noqa: E731
  np.testing.assert_array_equal(max_pool(x, window, window), ref)
  ours, theirs = grad(lambda v: max_pool(v, window, window)), grad(
      lambda v: nn.max_pool(v, window, window))
  np.testing.assert_array_equal(ours, theirs)
  # Ties exist, and each window's cotangent went to exactly one element.
  assert int((ours != 0).sum()) == ref.size


def test_hvp_and_forward_mode_are_nn_max_pools():
  x = _tied((2, 8, 8, 3))
  v = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  out = []
  for pool in (lambda z: max_pool(z, (2, 2), (2, 2)), lambda z: nn.max_pool(z, (2, 2), (2, 2))):
    f = lambda z, pool=pool: (pool(jnp.tanh(z)) ** 2).sum()  # noqa: E731
    out.append((jax.jvp(jax.grad(f), (x,), (v,))[1], jax.jvp(pool, (x,), (v,))[1]))
  for ours, theirs in zip(*out):
    np.testing.assert_array_equal(ours, theirs)
  assert float(jnp.abs(out[0][0]).sum()) > 1.0


def test_other_windows_fall_back_to_nn_max_pool():
  x = _tied((2, 9, 9, 2))
  args = ((3, 3), (2, 2)), dict(padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(max_pool(x, *args[0], **args[1]),
                                nn.max_pool(x, *args[0], **args[1]))


def test_the_main_models_train_step_is_unchanged():
  """SmallCNN's pooled step equals the one through nn.max_pool, bit for bit."""
  from baq.models import cnn  # pylint: disable=import-outside-toplevel
  model = cnn.SmallCNN(num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 16, 16, 3))
  y = jnp.arange(16) % 3
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)

  def loss(p):
    return -jnp.mean(jax.nn.log_softmax(model.apply(p, x))[jnp.arange(16), y])
  ours = jax.jit(jax.grad(loss))(params)
  original = cnn.max_pool
  cnn.max_pool = lambda v, w, s: nn.max_pool(v, w, s)
  try:
    theirs = jax.jit(jax.grad(loss))(params)
  finally:
    cnn.max_pool = original
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
