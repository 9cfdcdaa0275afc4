"""Layers and helpers that several model families share (no family imports another).

PyTorch's conventions, so converted torchvision / timm weights behave as in
PyTorch: BatchNorm's momentum and epsilon, the exact (erf) GELU, timm's
stochastic depth and dense initializer, and the bicubic resize of a ViT
position table to another patch grid (used by the models and the converter).

Every family takes a compute `dtype` (`config.model.dtype`) that it hands to
each Conv, Dense, BatchNorm and LayerNorm: parameters stay float32, the norms
reduce in float32 (Flax's rule), attention softmaxes run in float32 and the
logits come out in float32 (`float32_logits`), as big_vision and the flax
examples do mixed precision.
"""

from __future__ import annotations

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
