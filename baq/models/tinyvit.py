"""TinyViT (Wu et al., 2022) in timm's layout (`tiny_vit_5m_224` by default).

A conv stem (two stride-2 ConvNorms), an MBConv stage, then three stages of
a PatchMerging downsample and windowed-attention blocks. Each attention block
is x + attn(x) in local windows (LayerNorm inside the attention, a learned
bias per head and per relative offset |dy|, |dx|), a 3x3 depthwise ConvNorm,
and x + mlp(x) (LayerNorm inside the MLP). The head is mean pool, LayerNorm,
Dense.

Flax names follow timm's with list indices joined by "_", so the converter
maps "stages.1.blocks.0.attn.qkv.weight" to stages_1/blocks_0/attn/qkv; only
the head differs (head.norm -> head_norm, head.fc -> head). All Conv/Dense
layers, depthwise ones included, go through `Conv(quant)` / `Dense(quant)`.
The qkv kernel keeps timm's per-head (q, k, v) output layout.

Any input size works: windows that do not tile a feature map are padded, as
in timm. `window_sizes` is the resolution knob (it sets the bias tables).
Registered as "tinyvit_5m" with its converter (`TIMM`).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from baq.models import register_model
from baq.models.convert import KeyRules
from baq.models.layers import DENSE_INIT, DropPath, batch_norm, float32_logits, gelu, softmax
from baq.quant.inject import Conv, Dense, Quantizer

# timm's names that differ from the Flax paths: only the head.
TIMM = KeyRules(renames=(("^head.norm.", "head_norm."), ("^head.fc.", "head.")))


def attention_bias_index(window: int) -> tuple[np.ndarray, int]:
  """timm's bias index: offsets (|dy|, |dx|) numbered in order of first sight.

  Args:
    window: side of the square window.

  Returns:
    ((window^2, window^2) int index into the bias table, table length).
  """
  points = list(itertools.product(range(window), range(window)))
  offsets: dict[tuple[int, int], int] = {}
  idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets))
         for a in points for b in points]
  return np.asarray(idx, np.int32).reshape(len(points), len(points)), len(offsets)


class ConvNorm(nn.Module):
  """Bias-free convolution (padding k//2) followed by float BatchNorm.

  Attributes:
    features: output channels.
    kernel: kernel side.
    stride: stride.
    groups: feature groups (= channels for depthwise).
    bn_scale: initial BatchNorm scale (timm zero-inits MBConv's last one).
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (every TinyViT module's `dtype`; statistics stay float32).
  """

  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  bn_scale: float = 1.0
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    pad = self.kernel // 2
    x = Conv(self.quant, self.dtype)(self.features, (self.kernel, self.kernel), strides=self.stride,
                         padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                         use_bias=False, name="conv")(x)
    return batch_norm(train, "bn", nn.initializers.constant(self.bn_scale), self.dtype)(x)


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, add, GELU."""

  expand: float = 4.0
  drop_path: float = 0.0
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    c, kw = x.shape[-1], dict(quant=self.quant, dtype=self.dtype)
    mid = int(c * self.expand)
    y = gelu(ConvNorm(mid, 1, **kw, name="conv1")(x, train))
    y = gelu(ConvNorm(mid, 3, groups=mid, **kw, name="conv2")(y, train))
    y = ConvNorm(c, 1, bn_scale=0.0, **kw, name="conv3")(y, train)
    return gelu(x + DropPath(self.drop_path)(y, train))


class Attention(nn.Module):
  """Window attention with a per-head bias over relative offsets.

  Attributes:
    num_heads: attention heads (key dim = value dim = width / heads).
    window: window side; sets the bias table.
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (the softmax runs in float32).
  """

  num_heads: int
  window: int
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, n, dim = x.shape
    hd, dense = dim // self.num_heads, Dense(self.quant, self.dtype)
    idx, table = attention_bias_index(self.window)
    biases = self.param("attention_biases", nn.initializers.zeros, (self.num_heads, table))
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    qkv = dense(3 * dim, kernel_init=DENSE_INIT, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, n, self.num_heads, 3 * hd).transpose(0, 2, 1, 3), 3, -1)
    attn = ((q * hd**-0.5) @ k.swapaxes(-1, -2)).astype(jnp.float32) + biases[:, idx]
    x = (softmax(attn, axis=-1, dtype=v.dtype) @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
    return dense(dim, kernel_init=DENSE_INIT, name="proj")(x)


class TinyVitBlock(nn.Module):
  """x + window_attn(x); depthwise 3x3 ConvNorm; x + mlp(x). NHWC in and out."""

  num_heads: int
  window: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    b, h, w, c = x.shape
    ws, q, dt = self.window, self.quant, self.dtype
    ph, pw = -h % ws, -w % ws
    y = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // ws, (w + pw) // ws
    y = y.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    y = Attention(self.num_heads, ws, q, dt, name="attn")(y)
    y = y.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h + ph, w + pw, c)
    x = x + DropPath(self.drop_path)(y[:, :h, :w], train)
    x = ConvNorm(c, 3, groups=c, quant=q, dtype=dt, name="local_conv")(x, train)
    y = _NormMlp(int(c * self.mlp_ratio), q, dt, name="mlp")(x)
    return x + DropPath(self.drop_path)(y, train)


class _NormMlp(nn.Module):
  """LayerNorm, fc1, GELU, fc2 (timm's NormMlp)."""

  hidden: int
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense, out = Dense(self.quant, self.dtype), x.shape[-1]
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    x = gelu(dense(self.hidden, kernel_init=DENSE_INIT, name="fc1")(x))
    return dense(out, kernel_init=DENSE_INIT, name="fc2")(x)


class _Stage(nn.Module):
  """One stage: optional PatchMerging ("downsample"), then blocks_{j}."""

  dim: int
  depth: int
  num_heads: int = 0  # 0: an MBConv stage.
  window: int = 7
  mlp_ratio: float = 4.0
  drop_paths: Sequence[float] = ()
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    q, dt = self.quant, self.dtype
    if self.num_heads:
      x = _PatchMerging(self.dim, q, dt, name="downsample")(x, train)
    for j in range(self.depth):
      if self.num_heads:
        x = TinyVitBlock(self.num_heads, self.window, self.mlp_ratio, self.drop_paths[j], q, dt,
                         name=f"blocks_{j}")(x, train)
      else:
        x = MBConv(4.0, self.drop_paths[j], q, dt, name=f"blocks_{j}")(x, train)
    return x


class _PatchMerging(nn.Module):
  """1x1 ConvNorm, GELU, stride-2 depthwise 3x3 ConvNorm, GELU, 1x1 ConvNorm."""

  dim: int
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    d, kw = self.dim, dict(quant=self.quant, dtype=self.dtype)
    x = gelu(ConvNorm(d, 1, **kw, name="conv1")(x, train))
    x = gelu(ConvNorm(d, 3, 2, groups=d, **kw, name="conv2")(x, train))
    return ConvNorm(d, 1, **kw, name="conv3")(x, train)


class _PatchEmbed(nn.Module):
  """Stride-4 stem: two stride-2 3x3 ConvNorms with a GELU between."""

  dim: int
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    kw = dict(quant=self.quant, dtype=self.dtype)
    x = gelu(ConvNorm(self.dim // 2, 3, 2, **kw, name="conv1")(x, train))
    return ConvNorm(self.dim, 3, 2, **kw, name="conv2")(x, train)


class TinyViT(nn.Module):
  """TinyViT classifier on NHWC images.

  Attributes:
    num_classes: number of output logits.
    embed_dims: width of each stage.
    depths: blocks per stage (the first stage is MBConv).
    num_heads: attention heads per stage (the first entry is unused).
    window_sizes: attention window side per stage (the first is unused).
    mlp_ratio: MLP hidden width over the stage width.
    drop_path_rate: stochastic depth, rising linearly to this over all blocks.
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (parameters stay float32, the logits are float32).
  """

  num_classes: int
  embed_dims: Sequence[int] = (64, 128, 160, 320)
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (2, 4, 5, 10)
  window_sizes: Sequence[int] = (7, 7, 14, 7)
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits of a batch.

    Args:
      x: images, (batch, height, width, channels).
      train: batch statistics for BatchNorm, stochastic depth (rng "dropout").

    Returns:
      (batch, num_classes) logits.
    """
    q, dims, dt = self.quant, self.embed_dims, self.dtype
    x = _PatchEmbed(dims[0], q, dt, name="patch_embed")(x, train)
    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    for s, depth in enumerate(self.depths):
      start = sum(self.depths[:s])
      x = _Stage(dims[s], depth, self.num_heads[s] if s else 0, self.window_sizes[s],
                 self.mlp_ratio, rates[start:start + depth], q, dt, name=f"stages_{s}")(x, train)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dt, name="head_norm")(jnp.mean(x, axis=(1, 2)))
    return float32_logits(Dense(q, dt)(self.num_classes, kernel_init=DENSE_INIT, name="head")(x))


@register_model("tinyvit_5m", converter=TIMM)
def tinyvit_5m(num_classes: int, quant: Optional[Quantizer] = None, **kwargs: Any) -> TinyViT:
  """TinyViT-5M (timm's tiny_vit_5m_224 at the default attributes).

  Args:
    num_classes: number of output logits.
    quant: quantization factory, or None for the float model.
    **kwargs: overrides of `TinyViT` attributes (`embed_dims`, `window_sizes`, ...).

  Returns:
    An unbound `TinyViT`.
  """
  return TinyViT(num_classes=num_classes, quant=quant, **kwargs)
