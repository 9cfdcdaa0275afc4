"""DeiT (a ViT with a class and optional distillation token), in timm's layout.

Layer names mirror timm's `VisionTransformer` so the converter maps them one
to one: patch_embed (timm patch_embed.proj), cls_token, dist_token, pos_embed,
blocks_{i}/{norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2}, norm, head,
head_dist. Attention is written from `Dense(quant)` layers (never
`nn.MultiHeadDotProductAttention`), so q/k/v, the projection and the MLP are
all quantized by injection. The fused qkv kernel keeps timm's output layout
(3, heads, head_dim), so importing it is a transpose.

The position embedding is sized for `img_size // patch_size`; inputs of
another size get it resized (bicubic) on the fly, as timm's dynamic_img_size.
Registered as "deit_tiny", sized per image size (about 8x8 patches at 64 px).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from baq.models import register_model
from baq.models.convert import KeyRules
from baq.models.layers import (DENSE_INIT, DropPath, float32_logits, gelu, resize_pos_embed,
                               softmax)
from baq.quant.inject import Conv, Dense, Quantizer

# timm's names that differ from the Flax paths; two heads when distilled.
TIMM = KeyRules(renames=(("^patch_embed.proj.", "patch_embed."),), heads=("head", "head_dist"))


class Attention(nn.Module):
  """Multi-head self-attention from a fused qkv Dense and a projection Dense.

  Attributes:
    num_heads: attention heads; the width must divide by it.
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (the softmax runs in float32).
  """

  num_heads: int
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, n, dim = x.shape
    head_dim = dim // self.num_heads
    dense = Dense(self.quant, self.dtype)
    qkv = dense(3 * dim, kernel_init=DENSE_INIT, name="qkv")(x)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    attn = softmax((q * head_dim**-0.5) @ k.swapaxes(-1, -2), axis=-1)
    x = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
    return dense(dim, kernel_init=DENSE_INIT, name="proj")(x)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2 (timm's Mlp), back to the input width.

  Attributes:
    hidden: width of the hidden layer.
    quant: quantization factory, or None for the float model.
    dtype: compute dtype.
  """

  hidden: int
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense, out = Dense(self.quant, self.dtype), x.shape[-1]
    x = gelu(dense(self.hidden, kernel_init=DENSE_INIT, name="fc1")(x))
    return dense(out, kernel_init=DENSE_INIT, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

  Attributes:
    num_heads: attention heads.
    mlp_ratio: MLP hidden width over the model width.
    drop_path: stochastic depth rate of both branches.
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (LayerNorm statistics stay float32).
  """

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    dim, q, dt = x.shape[-1], self.quant, self.dtype
    y = nn.LayerNorm(epsilon=1e-6, dtype=dt, name="norm1")(x)
    x = x + DropPath(self.drop_path)(Attention(self.num_heads, q, dt, name="attn")(y), train)
    y = nn.LayerNorm(epsilon=1e-6, dtype=dt, name="norm2")(x)
    y = Mlp(int(dim * self.mlp_ratio), q, dt, name="mlp")(y)
    return x + DropPath(self.drop_path)(y, train)


class DeiT(nn.Module):
  """DeiT / ViT classifier on NHWC images.

  Attributes:
    num_classes: number of output logits.
    img_size: image side the position embedding is sized for.
    patch_size: side of the square patches.
    dim: token width.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width over `dim`.
    distilled: add the distillation token and `head_dist`; the logits are
      then the mean of both heads (timm's inference output).
    drop_rate: dropout on the embedded tokens.
    drop_path_rate: stochastic depth, rising linearly to this over the blocks.
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (parameters stay float32, the logits are float32).
  """

  num_classes: int
  img_size: int = 224
  patch_size: int = 16
  dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  distilled: bool = False
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits of a batch.

    Args:
      x: images, (batch, height, width, channels).
      train: enables dropout / stochastic depth (rng "dropout") if their rates
        are non-zero.

    Returns:
      (batch, num_classes) logits.
    """
    p, dt = self.patch_size, self.dtype
    x = Conv(self.quant, dt)(self.dim, (p, p), strides=(p, p), padding="VALID",
                             name="patch_embed")(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, self.dim)
    tokens = ["cls_token"] + (["dist_token"] if self.distilled else [])
    # The float32 tokens and table join the stream in its dtype (else they would promote it).
    prefix = [jnp.broadcast_to(self.param(t, nn.initializers.normal(1e-6), (1, 1, self.dim)),
                               (b, 1, self.dim)).astype(x.dtype) for t in tokens]
    grid = self.img_size // p
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, len(tokens) + grid * grid, self.dim))
    pos = resize_pos_embed(pos, len(tokens), (gh, gw)).astype(x.dtype)
    x = jnp.concatenate(prefix + [x], axis=1) + pos
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = Block(self.num_heads, self.mlp_ratio, rate, self.quant, dt, name=f"blocks_{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=dt, name="norm")(x)
    dense = Dense(self.quant, dt)
    logits = dense(self.num_classes, kernel_init=DENSE_INIT, name="head")(x[:, 0])
    if self.distilled:
      dist = dense(self.num_classes, kernel_init=DENSE_INIT, name="head_dist")(x[:, 1])
      logits = (logits + dist) / 2
    return float32_logits(logits)


def _deit_size_options(image_size: int) -> dict:
  # The position table follows the images; small images keep ~8x8 patches.
  return dict(img_size=image_size, patch_size=16 if image_size >= 160 else 8)


@register_model("deit_tiny", size_options=_deit_size_options, converter=TIMM)
def deit_tiny(num_classes: int, quant: Optional[Quantizer] = None, **kwargs: Any) -> DeiT:
  """DeiT-Tiny (timm's deit_tiny_patch16_224 at the default attributes).

  Args:
    num_classes: number of output logits.
    quant: quantization factory, or None for the float model.
    **kwargs: overrides of `DeiT` attributes (`img_size`, `patch_size`, ...).

  Returns:
    An unbound `DeiT`.
  """
  return DeiT(num_classes=num_classes, quant=quant, **kwargs)
