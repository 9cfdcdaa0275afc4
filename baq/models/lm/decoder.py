"""One decoder-only transformer that runs GPT-2, OPT, Llama, Mistral and Qwen2 checkpoints.

The families differ only in a few switches (`DecoderConfig`, in
`config.py`): LayerNorm or RMSNorm, learned or rotary positions, the MLP's
activation, which projections carry a bias, grouped-query heads, a sliding
window and a tied head. Every block is pre-norm: h + attn(attn_norm(h)), then h + mlp(mlp_norm(h)).

Parameter paths are a contract that converters and quantization rules rely
on: embed/embedding, pos_embed/embedding (learned positions only),
block_{i}/{attn_norm, attn/{q,k,v,o}_proj, mlp_norm, mlp/{gate,up,down}_proj},
final_norm, lm_head (absent when tied: logits = h @ embed^T). Every
projection is a `Dense(quant)`, so a `Quantizer` whose rules match
"block_\\d+/(attn|mlp)/.*" quantizes them with no quantization code here.

Positions: without an `attention_mask`, token j sits at position j; with a
(left-padding) mask, a real token's position counts the real tokens before
it (cumsum(mask) - 1), as Hugging Face's OPT and its generation code do, so
a padded prompt gives its real tokens the same logits as the unpadded one.
Padded query rows give unspecified (finite) values.

The KV cache is a plain pytree threaded through `decode` (no mutable
collections): per layer k, v of [b, max_len, n_kv_heads, head_dim], the
write `index` and `valid` [b, max_len], which slots hold real tokens.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from baq.models.lm.attention import (apply_rope, attend, causal_mask, inverse_frequencies,
                                     positions_from_mask)
from baq.models.lm.config import DecoderConfig
from baq.quant.inject import Dense, Quantizer

ACTIVATIONS = {"gelu_tanh": lambda x: nn.gelu(x, approximate=True),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}
INIT = nn.initializers.normal(0.02)  # the initializer_range of every family here


def _norm(cfg: DecoderConfig, name: Optional[str] = None) -> nn.Module:
  if cfg.norm == "layernorm":
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_fast_variance=False, dtype=jnp.float32,
                        name=name)
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """q/k/v projections, rotary positions, (cached) attention, o_proj."""

  config: DecoderConfig
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x, positions, mask, kv=None, index=None):
    c = self.config
    b, t, _ = x.shape
    dense = Dense(self.quant)

    def project(heads, name):
      y = dense(heads * c.head_dim, use_bias=c.attn_bias, kernel_init=INIT, name=name)(x)
      return y.reshape(b, t, heads, c.head_dim)

    q, k, v = project(c.n_heads, "q_proj"), project(c.n_kv_heads, "k_proj"), project(
        c.n_kv_heads, "v_proj")
    if c.positions == "rope":
      inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if kv is not None:  # write this step's keys at the cache index, attend to the whole cache
      k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, index, 0, 0))
      kv = {"k": k, "v": v}
    out = attend(q, k, v, mask).reshape(b, t, c.n_heads * c.head_dim)
    return dense(c.d_model, use_bias=c.out_bias, kernel_init=INIT, name="o_proj")(out), kv


class Mlp(nn.Module):
  """up_proj -> activation -> down_proj, or SwiGLU: down(silu(gate(x)) * up(x))."""

  config: DecoderConfig
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = Dense(self.quant)
    proj = lambda n, name: dense(n, use_bias=c.mlp_bias, kernel_init=INIT, name=name)
    if c.mlp == "swiglu":
      h = nn.silu(proj(c.d_ff, "gate_proj")(x)) * proj(c.d_ff, "up_proj")(x)
    else:
      h = ACTIVATIONS[c.mlp](proj(c.d_ff, "up_proj")(x))
    return proj(c.d_model, "down_proj")(h)


class Block(nn.Module):
  """Pre-norm decoder block; returns (h, the layer's updated cache or None)."""

  config: DecoderConfig
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x, positions, mask, kv=None, index=None):
    a, kv = Attention(self.config, self.quant, name="attn")(
        _norm(self.config, "attn_norm")(x), positions, mask, kv, index)
    x = x + a
    return x + Mlp(self.config, self.quant, name="mlp")(_norm(self.config, "mlp_norm")(x)), kv


def _context(cfg: DecoderConfig, shape, positions, attention_mask):
  """(positions [b, t], mask [b, t, t]) of a full (uncached) forward pass."""
  b, t = shape
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  if positions is None:
    positions = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                 if attention_mask is None else positions_from_mask(valid))
  slots = jnp.arange(t)
  return positions, causal_mask(slots, slots, valid, cfg.sliding_window)


def apply_block(config: DecoderConfig, block_params, h: jnp.ndarray) -> jnp.ndarray:
  """One float block on hidden states [b, t, d] from its own params (`params["block_i"]`).

  The same computation as `CausalLM.run_block`, but one traced program
  serves every block of a model (GPTQ jits it once, not once per block).
  """
  positions, mask = _context(config, h.shape[:2], None, None)
  return Block(config).apply({"params": block_params}, h, positions, mask)[0]


class CausalLM(nn.Module):
  """The decoder with embeddings and head; see the module docstring for the contract.

  Attributes:
    config: the architecture.
    quant: quantization factory, or None for the float model.
  """

  config: DecoderConfig
  quant: Optional[Quantizer] = None

  def setup(self):
    c = self.config
    # Explicit names: the module paths are the converters' contract, and
    # `embed` is also the name of a method.
    self.tok_embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=INIT, name="embed")
    if c.positions == "learned":
      self.pos_table = nn.Embed(c.max_len + c.position_offset, c.d_model,
                                embedding_init=INIT, name="pos_embed")
    self.block = [Block(c, self.quant) for _ in range(c.n_layers)]  # block_0, block_1, ...
    self.final_norm = _norm(c)
    if not c.tie_embeddings:
      self.lm_head = Dense(self.quant)(c.vocab_size, use_bias=False, kernel_init=INIT)

  def embed(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Token (plus learned position) embeddings [b, t, d] (positions default 0..t-1)."""
    h = self.tok_embed(tokens).astype(jnp.float32)
    if self.config.positions == "learned":
      if positions is None:
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
      h = h + self.pos_table(positions + self.config.position_offset)
    return h

  def run_block(self, h: jnp.ndarray, i: int, positions: Optional[jnp.ndarray] = None,
                attention_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Block `i` alone on hidden states h [b, t, d] (what GPTQ runs block by block)."""
    positions, mask = _context(self.config, h.shape[:2], positions, attention_mask)
    return self.block[i](h, positions, mask)[0]

  def head(self, h: jnp.ndarray) -> jnp.ndarray:
    """Final norm and logits [b, t, vocab] float32."""
    h = self.final_norm(h)
    logits = self.tok_embed.attend(h) if self.config.tie_embeddings else self.lm_head(h)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               attention_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Logits [b, t, vocab] of int tokens [b, t]; attention_mask [b, t] marks real tokens."""
    positions, mask = _context(self.config, tokens.shape, positions, attention_mask)
    h = self.embed(tokens, positions)
    for block in self.block:
      h = block(h, positions, mask)[0]
    return self.head(h)

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens (no params needed)."""
    c = self.config
    if c.positions == "learned" and max_len > c.max_len:
      raise ValueError(f"Cache max_len={max_len} exceeds the position table's "
                       f"max_len={c.max_len}.")
    shape = (batch, max_len, c.n_kv_heads, c.head_dim)
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(c.n_layers))
    return {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, max_len), bool),
            "layers": layers}

  def decode(self, tokens: jnp.ndarray, cache: dict, positions: Optional[jnp.ndarray] = None,
             attention_mask: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, dict]:
    """Logits of `tokens` [b, t] continuing the cached ones, and the updated cache.

    Args:
      tokens: int [b, t], written at slots index .. index + t - 1.
      cache: from `init_cache` or a previous `decode`.
      positions: [b, t]; default: the real tokens before each one.
      attention_mask: [b, t] bool, False on (left) padding of a prompt.

    Returns:
      (logits [b, t, vocab] float32, new cache).
    """
    b, t = tokens.shape
    index, slots = cache["index"], cache["valid"].shape[1]
    if not isinstance(index, jax.core.Tracer) and int(index) + t > slots:
      raise ValueError(f"Cache overflow: {int(index)} + {t} tokens > max_len={slots}.")
    new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
      positions = positions_from_mask(new, jnp.sum(cache["valid"], axis=1))
    valid = jax.lax.dynamic_update_slice(cache["valid"], new, (0, index))
    mask = causal_mask(index + jnp.arange(t), jnp.arange(slots), valid,
                       self.config.sliding_window)
    h, layers = self.embed(tokens, positions), []
    for block, kv in zip(self.block, cache["layers"]):
      h, kv = block(h, positions, mask, kv, index)
      layers.append(kv)
    return self.head(h), {"index": index + t, "valid": valid, "layers": tuple(layers)}
