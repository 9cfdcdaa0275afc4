"""ResNet-18 / ResNet-50 in torchvision's layout (v1.5: stride on the 3x3 conv),
and the CIFAR-style ResNet-8/20/32/56 (`resnet{8,20,32,56}_cifar`) built from it.

The layer names follow torchvision with readable Flax paths, so quantization
rules and the weight converter (`baq.models.convert`, with the renames in
`TORCHVISION` registered here beside "resnet18" and "resnet50") match them:

  stem_conv, stem_bn                      (torchvision conv1, bn1)
  layer{s}_{b}/conv{1,2,3}, bn{1,2,3}     (layer{s}.{b}.conv1 ...)
  layer{s}_{b}/downsample_conv, _bn       (layer{s}.{b}.downsample.0 / .1)
  head                                    (fc)

Every convolution and the classifier go through `Conv(quant)` / `Dense(quant)`
so quantization is injected; BatchNorm stays float. BatchNorm statistics live
in the "batch_stats" collection: `model.apply(variables, x, train=True,
mutable=["batch_stats"])` updates them, `train=False` uses them.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from baq.models import register_model
from baq.models.convert import KeyRules
from baq.models.layers import batch_norm, float32_logits
from baq.quant.inject import Conv, Dense, Quantizer

# torchvision initialises convolutions with kaiming_normal(fan_out, relu).
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# torchvision's names that differ from the Flax paths (see the module docstring).
TORCHVISION = KeyRules(renames=(("^conv1.", "stem_conv."), ("^bn1.", "stem_bn."), ("^fc.", "head."),
                                (".downsample.0.", ".downsample_conv."),
                                (".downsample.1.", ".downsample_bn.")))


def _conv(quant: Optional[Quantizer], features: int, kernel: int, stride: int, name: str,
          dtype: Any, groups: int = 1) -> nn.Module:
  # Explicit symmetric padding k//2, as PyTorch does: Flax's "SAME" pads
  # (k-1)//2 before and k//2 after on stride 2, shifting the sampling grid.
  pad = kernel // 2
  return Conv(quant, dtype)(features, (kernel, kernel), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                     use_bias=False, kernel_init=_CONV_INIT, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

  Attributes:
    features: output channels.
    stride: stride of the first convolution (and of the projection).
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """

  features: int
  stride: int = 1
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    q, dt = self.quant, self.dtype
    y = _conv(q, self.features, 3, self.stride, "conv1", dt)(x)
    y = nn.relu(batch_norm(train, "bn1", dtype=dt)(y))
    y = _conv(q, self.features, 3, 1, "conv2", dt)(y)
    y = batch_norm(train, "bn2", dtype=dt)(y)
    return nn.relu(y + _shortcut(self, x, self.features, train))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, torchvision v1.5), 1x1 expand by 4.

  Attributes:
    features: width of the 3x3 convolution; the block outputs 4x as many.
    stride: stride of the 3x3 convolution (and of the projection).
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """

  features: int
  stride: int = 1
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    out, q, dt = self.features * self.expansion, self.quant, self.dtype
    y = _conv(q, self.features, 1, 1, "conv1", dt)(x)
    y = nn.relu(batch_norm(train, "bn1", dtype=dt)(y))
    y = _conv(q, self.features, 3, self.stride, "conv2", dt)(y)
    y = nn.relu(batch_norm(train, "bn2", dtype=dt)(y))
    y = _conv(q, out, 1, 1, "conv3", dt)(y)
    y = batch_norm(train, "bn3", dtype=dt)(y)
    return nn.relu(y + _shortcut(self, x, out, train))


def _shortcut(block: nn.Module, x: jnp.ndarray, out: int, train: bool) -> jnp.ndarray:
  # Called inside the block's compact __call__, so the layers are its children.
  if block.stride == 1 and x.shape[-1] == out:
    return x
  x = _conv(block.quant, out, 1, block.stride, "downsample_conv", block.dtype)(x)
  return batch_norm(train, "downsample_bn", dtype=block.dtype)(x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """ResNet for NHWC images of any size (7x7 stem, 4 stages, global pool).

  Attributes:
    num_classes: number of output logits.
    block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101).
    stage_sizes: blocks per stage.
    width: channels of the stem and of the first stage (doubling per stage).
    small_stem: a 3x3 stride-1 stem without max-pooling, for 32x32 inputs
      (not torchvision's layout; the converter leaves such a stem unmatched).
    quant: quantization factory, or None for the float model.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32;
      the logits are float32).
  """

  num_classes: int
  block: str = "basic"
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  small_stem: bool = False
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits of a batch.

    Args:
      x: images, (batch, height, width, channels).
      train: batch statistics (and their update) instead of running ones.

    Returns:
      (batch, num_classes) logits.
    """
    block_cls, dt = BLOCKS[self.block], self.dtype
    stem = (3, 1) if self.small_stem else (7, 2)
    x = _conv(self.quant, self.width, *stem, "stem_conv", dt)(x)
    x = nn.relu(batch_norm(train, "stem_bn", dtype=dt)(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for s, size in enumerate(self.stage_sizes):
      for b in range(size):
        stride = 2 if s > 0 and b == 0 else 1
        x = block_cls(self.width * 2**s, stride, self.quant, dt,
                      name=f"layer{s + 1}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return float32_logits(Dense(self.quant, dt)(self.num_classes, name="head")(x))


def resnet(depth: int, num_classes: int, quant: Optional[Quantizer] = None,
           **kwargs: Any) -> ResNet:
  """A torchvision ResNet-`depth` (18, 34, 50 or 101).

  Args:
    depth: network depth; picks the block type and the stage sizes.
    num_classes: number of output logits.
    quant: quantization factory, or None for the float model.
    **kwargs: overrides of `ResNet` attributes (`stage_sizes`, `width`, ...).

  Returns:
    An unbound `ResNet`.
  """
  if depth not in STAGE_SIZES:
    raise ValueError(f"Unknown ResNet depth {depth}. Valid: {sorted(STAGE_SIZES)}.")
  kw = dict(block="basic" if depth < 50 else "bottleneck", stage_sizes=STAGE_SIZES[depth])
  kw.update(kwargs)
  return ResNet(num_classes=num_classes, quant=quant, **kw)


resnet18 = register_model("resnet18", converter=TORCHVISION)(functools.partial(resnet, 18))
resnet50 = register_model("resnet50", converter=TORCHVISION)(functools.partial(resnet, 50))

# CIFAR-style ResNets (He et al. 2016, section 4.2), depth 6n + 2 at 32 px: a
# 3x3 stride-1 stem of 16 channels, three stages of n basic blocks at 16, 32
# and 64 channels, global pooling and the classifier. ResNet-8 (n=1) has 10
# quantized layers (with the two 1x1 projection shortcuts, the paper's option
# B rather than zero-padding, so every layer is a convolution bits can be
# allocated to) and 77k weights; ResNet-20 (n=3) 22 layers and 270k.
CIFAR_DEPTHS = (8, 20, 32, 56)


def cifar_resnet(depth: int, num_classes: int, quant: Optional[Quantizer] = None,
                 **kwargs: Any) -> ResNet:
  """A CIFAR ResNet-`depth` (6n + 2 layers; `width` and other ResNet options apply)."""
  if depth not in CIFAR_DEPTHS:
    raise ValueError(f"Unknown CIFAR ResNet depth {depth}. Valid: {list(CIFAR_DEPTHS)}.")
  n = (depth - 2) // 6
  kw = dict(block="basic", stage_sizes=(n, n, n), width=16, small_stem=True)
  kw.update(kwargs)
  return ResNet(num_classes=num_classes, quant=quant, **kw)


for _depth in CIFAR_DEPTHS:
  register_model(f"resnet{_depth}_cifar")(functools.partial(cifar_resnet, _depth))
