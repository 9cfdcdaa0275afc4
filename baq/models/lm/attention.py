"""The decoder's pure attention mathematics: positions, rotary embeddings, masks, attention.

Plain functions of arrays (no parameters), shared by every family in
`baq.models.lm.decoder` and testable on their own.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def positions_from_mask(mask: jnp.ndarray, start=0) -> jnp.ndarray:
  """[b, t] positions: `start` plus the real tokens before each one (padding: clamped).

  Args:
    mask: [b, t] bool, True on real tokens.
    start: scalar or [b] positions already taken (the cache's real tokens).

  Returns:
    int32 [b, t].
  """
  start = jnp.reshape(jnp.asarray(start, jnp.int32), (-1, 1))
  return jnp.maximum(start + jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def inverse_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """Rotary frequencies theta^(-2i/d), i < d/2, with Llama 3's rescaling if given.

  Args:
    head_dim: per-head width d (even).
    theta: the base.
    scaling: None or (factor, low_freq_factor, high_freq_factor, original_max_len):
      wavelengths above original_max_len / low_freq_factor are slowed by
      `factor`, those below original_max_len / high_freq_factor kept, and the
      band between interpolated (HF's "llama3" rope_type).

  Returns:
    float32 [head_dim // 2].
  """
  inv = 1.0 / theta**(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is not None:
    factor, low, high, old_len = scaling
    wavelen = 2 * np.pi / inv
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    inv = (1 - smooth) * inv / factor + smooth * inv
  return inv.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates x [b, t, heads, d] by its positions [b, t] in HF's rotate_half layout.

  HF's Llama-family checkpoints have q/k rows permuted for this layout (the
  two halves of a head pair up), so their weights load unchanged.
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * jnp.cos(angles) + rotated * jnp.sin(angles)


def causal_mask(q_slots, k_slots, key_valid, window: Optional[int]) -> jnp.ndarray:
  """[b, t, s] bool: causal (by slot), within the window, and to real keys only."""
  q, k = q_slots[:, None], k_slots[None, :]
  allowed = k <= q
  if window is not None:
    allowed = allowed & (k > q - window)
  return allowed[None] & key_valid[:, None, :]


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Scaled dot-product attention, with query head h reading key/value head h // group.

  Args:
    q: [b, t, n_heads, d] queries.
    k: [b, s, n_kv, d] keys; v the same for values.
    mask: [b, t, s] bool.

  Returns:
    [b, t, n_heads, d].
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  # Grouping the queries instead of repeating k/v (HF's repeat_kv) gives the
  # same pairing without materializing n_heads copies of the cache.
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(d)
  # The most negative finite value, not -inf: a fully masked (padding) row
  # stays finite instead of turning into NaN.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
