"""Layers and helpers that several model families share (no family imports another).

PyTorch's conventions, so converted torchvision / timm weights behave as in
PyTorch: BatchNorm's momentum and epsilon, the exact (erf) GELU, timm's
stochastic depth and dense initializer, and the bicubic resize of a ViT
position table to another patch grid (used by the models and the converter).
`max_pool` is Flax's, computed without XLA's select-and-scatter on CPU.

Every family takes a compute `dtype` (`config.model.dtype`) that it hands to
each Conv, Dense, BatchNorm and LayerNorm: parameters stay float32, the norms
reduce in float32 (Flax's rule), attention softmaxes run in float32 and the
logits come out in float32 (`float32_logits`), as big_vision and the flax
examples do mixed precision.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# timm initialises Linear layers with trunc_normal(std=0.02).
DENSE_INIT = nn.initializers.truncated_normal(0.02)


def batch_norm(train: bool, name: str, scale_init=nn.initializers.ones,
               dtype=None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, i.e. Flax 0.9; eps 1e-5).

  Args:
    train: batch statistics (and their update) instead of running ones.
    name: the module's name (torchvision's, for the converter).
    scale_init: initializer of the scale.
    dtype: the output dtype; the statistics are float32 whatever it is.

  Returns:
    The unbound `nn.BatchNorm`.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=scale_init, dtype=dtype, name=name)


def softmax(x: jnp.ndarray, axis: int = -1, dtype=None) -> jnp.ndarray:
  """Softmax computed in float32 (attention under bf16), returned in `dtype` (None: x's)."""
  return jax.nn.softmax(x.astype(jnp.float32), axis=axis).astype(dtype or x.dtype)


def float32_logits(x: jnp.ndarray) -> jnp.ndarray:
  """A model's logits in float32 (the loss and penalties see float32 always)."""
  return x.astype(jnp.float32)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """PyTorch's nn.GELU (exact erf form; Flax's default is the tanh one)."""
  return nn.gelu(x, approximate=False)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0.0)


def resize_pos_embed(pos: jnp.ndarray, num_prefix: int, grid: tuple[int, int]) -> jnp.ndarray:
  """Resizes a (1, prefix + g*g, dim) position embedding to a new patch grid.

  Args:
    pos: the embedding; its patch part must be a square grid.
    num_prefix: leading tokens (class, distillation) left as they are.
    grid: (rows, cols) of the new patch grid.

  Returns:
    (1, prefix + rows * cols, dim) embedding.
  """
  prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
  old = int(round(patches.shape[1]**0.5))
  if old * old != patches.shape[1]:
    raise ValueError(f"Position embedding of {patches.shape[1]} patches is not a square grid.")
  if (old, old) == tuple(grid):
    return pos
  dim = patches.shape[-1]
  patches = jax.image.resize(patches.reshape(1, old, old, dim), (1, *grid, dim), "bicubic")
  return jnp.concatenate([prefix, patches.reshape(1, -1, dim)], axis=1)


def max_pool(x: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
             padding="VALID") -> jnp.ndarray:
  """`nn.max_pool` of [B, H, W, C], with the same values and the same gradient.

  Non-overlapping windows (window == strides, no padding) are a reshape and
  a max, and the gradient goes to the first maximum of each window in
  row-major order, as XLA's select-and-scatter (nn.max_pool's gradient)
  sends it. That gradient took 31 ms of the main job's 57 ms CPU train step;
  this one takes a few (benchmarks/train_step.py). Other windows are
  nn.max_pool's.

  Args:
    x: [B, H, W, C] activations.
    window: (rows, cols) of each window.
    strides: (rows, cols) steps between windows.
    padding: as nn.max_pool.

  Returns:
    [B, H', W', C], H' = H // rows (VALID).
  """
  window, strides = tuple(window), tuple(strides)
  if window != strides or padding != "VALID" or x.ndim != 4:
    return nn.max_pool(x, window, strides, padding=padding)
  return _tiled_max(x, window)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max(x: jnp.ndarray, window: tuple[int, int]) -> jnp.ndarray:
  return _tiles(x, window).max(axis=(2, 4))


def _tiles(x: jnp.ndarray, window: tuple[int, int]) -> jnp.ndarray:
  """[B, h, rows, w, cols, C]: the windows, the remainder VALID drops cut off."""
  (r, c), (b, height, width, ch) = window, x.shape
  h, w = height // r, width // c
  return x[:, :h * r, :w * c].reshape(b, h, r, w, c, ch)


@_tiled_max.defjvp
def _tiled_max_jvp(window, primals, tangents):
  # The first maximum of each window in row-major order is selected, as
  # nn.max_pool's select-and-gather does: the tangent is that element's, and
  # its transpose (the gradient) sends each window's cotangent to it, as
  # select-and-scatter does. The output is selected the same way, so a jvp
  # of this rule (an HVP, jvp of grad) differentiates the same element.
  (x,), (dx,) = primals, tangents
  tiles, dtiles = _tiles(x, window), _tiles(dx, window)
  peak = jax.lax.stop_gradient(tiles.max(axis=(2, 4)))
  taken = jnp.zeros(peak.shape, bool)
  y, dy = jnp.full_like(peak, jnp.nan), jnp.zeros_like(peak)  # NaN windows stay NaN
  for i in range(window[0]):
    for j in range(window[1]):
      first = (tiles[:, :, i, :, j] == peak) & ~taken
      taken = taken | first
      y = jnp.where(first, tiles[:, :, i, :, j], y)
      dy = jnp.where(first, dtiles[:, :, i, :, j], dy)
  return y, dy
