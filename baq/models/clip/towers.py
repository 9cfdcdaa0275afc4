"""CLIP's two towers and the pre-LN block they share (the layout is in `model.py`).

`VisionTower` embeds patches with a strided conv, prepends the class token,
adds learned positions and returns the class token's post-LN state;
`TextTower` attends causally over token and position embeddings and returns
the final-LN state at the EOS position.

EOS position (`TextConfig.pool`): "argmax" takes the position of the
largest token id (OpenAI CLIP, OpenCLIP's default and HF for configs whose
eos_token_id is the legacy 2: CLIP's end-of-text id 49407 is the largest id
of its vocabulary); "eos" takes the first position of `eos_token_id` (HF for
any other eos_token_id, OpenCLIP's pool_type "eos"). A row without that id
pools position 0, as torch's argmax of an all-false mask does.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from baq.models.clip.configs import ACTIVATIONS, CLIPConfig, TextConfig
from baq.models.lm.attention import attend, causal_mask
from baq.quant.inject import Conv, Dense, Quantizer

INIT = nn.initializers.normal(0.02)


def _norm(eps: float, name: Optional[str] = None) -> nn.Module:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """q/k/v projections (with biases), scaled dot-product attention under `mask`, o_proj."""

  width: int
  heads: int
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    b, t, _ = x.shape
    dense = Dense(self.quant)
    q, k, v = (dense(self.width, kernel_init=INIT, name=f"{n}_proj")(x).reshape(
        b, t, self.heads, -1) for n in "qkv")
    out = attend(q, k, v, mask).reshape(b, t, self.width)
    return dense(self.width, kernel_init=INIT, name="o_proj")(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2, both with biases."""

  width: int
  mlp_dim: int
  activation: str
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = Dense(self.quant)
    h = ACTIVATIONS[self.activation](dense(self.mlp_dim, kernel_init=INIT, name="fc1")(x))
    return dense(self.width, kernel_init=INIT, name="fc2")(h)


class Block(nn.Module):
  """Pre-LN block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

  width: int
  heads: int
  mlp_dim: int
  activation: str
  norm_eps: float
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    a = Attention(self.width, self.heads, self.quant, name="attn")
    x = x + a(_norm(self.norm_eps, "attn_norm")(x), mask)
    mlp = Mlp(self.width, self.mlp_dim, self.activation, self.quant, name="mlp")
    return x + mlp(_norm(self.norm_eps, "mlp_norm")(x))


def _blocks(config: CLIPConfig, tower, quant: Optional[Quantizer]) -> list[Block]:
  return [Block(tower.width, tower.heads, tower.mlp_dim, config.activation, config.norm_eps, quant)
          for _ in range(tower.layers)]


def eos_positions(tokens: jnp.ndarray, text: TextConfig) -> jnp.ndarray:
  """[b] positions whose features the text tower returns (the module docstring's rule).

  Args:
    tokens: int [b, t].
    text: the tower's configuration (its `pool` and `eos_token_id`).

  Returns:
    int [b]: the first position of the largest id ("argmax") or of eos_token_id ("eos").
  """
  if text.pool == "argmax":
    return jnp.argmax(tokens, axis=-1)
  return jnp.argmax(tokens == text.eos_token_id, axis=-1)


class VisionTower(nn.Module):
  """Patches, class token and positions -> pre_norm -> blocks -> post_norm of the class token."""

  config: CLIPConfig
  quant: Optional[Quantizer] = None

  def setup(self):
    c, v = self.config, self.config.vision
    p = v.patch_size
    self.patch_embed = Conv(self.quant)(v.width, (p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, kernel_init=INIT)
    self.class_embed = self.param("class_embed", nn.initializers.normal(v.width**-0.5),
                                  (v.width,))
    self.pos_embed = nn.Embed(v.positions, v.width, embedding_init=INIT)
    self.pre_norm = _norm(c.norm_eps)
    self.block = _blocks(c, v, self.quant)  # block_0, block_1, ...
    self.post_norm = _norm(c.norm_eps)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    v = self.config.vision
    if images.ndim != 4 or tuple(images.shape[1:]) != (v.image_size, v.image_size, 3):
      # No position interpolation: the table holds exactly the trained grid.
      raise ValueError(f"Images must be [b, {v.image_size}, {v.image_size}, 3] (NHWC, already "
                       f"normalised) for CLIPConfig.vision.image_size={v.image_size}, got "
                       f"{tuple(images.shape)}.")
    x = self.patch_embed(images.astype(jnp.float32))
    b = x.shape[0]
    x = x.reshape(b, -1, v.width)  # row-major over the grid, as torch's flatten(2)
    cls = jnp.broadcast_to(self.class_embed, (b, 1, v.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed(jnp.arange(v.positions))
    x = self.pre_norm(x)
    mask = jnp.ones((1, v.positions, v.positions), bool)
    for block in self.block:
      x = block(x, mask)
    return self.post_norm(x[:, 0])


class TextTower(nn.Module):
  """Tokens and positions -> causal blocks -> final_norm, read at the EOS position."""

  config: CLIPConfig
  quant: Optional[Quantizer] = None

  def setup(self):
    c, t = self.config, self.config.text
    self.token_embed = nn.Embed(t.vocab_size, t.width, embedding_init=INIT)
    self.pos_embed = nn.Embed(t.context_length, t.width, embedding_init=INIT)
    self.block = _blocks(c, t, self.quant)
    self.final_norm = _norm(c.norm_eps)

  def __call__(self, tokens: jnp.ndarray, attention_mask: Optional[jnp.ndarray] = None):
    t = self.config.text
    b, n = tokens.shape
    if n > t.context_length:
      raise ValueError(f"{n} tokens exceed CLIPConfig.text.context_length={t.context_length}.")
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(n))
    valid = jnp.ones((1, n), bool) if attention_mask is None else attention_mask.astype(bool)
    slots = jnp.arange(n)
    mask = causal_mask(slots, slots, valid, None)
    for block in self.block:
      x = block(x, mask)
    x = self.final_norm(x)
    return x[jnp.arange(b), eos_positions(tokens, t)]
