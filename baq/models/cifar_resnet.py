"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n + 2 at 32 px.

A 3x3 stride-1 stem of 16 channels, three stages of n basic blocks at 16,
32 and 64 channels (stride 2 on entering stages 2 and 3), global pooling
and the classifier: ResNet-8 (n=1: 10 quantized layers, with the two
projection shortcuts; 77k weights), ResNet-20 (n=3: 22 layers, 270k),
ResNet-32 and ResNet-56.
The shortcuts that change shape are 1x1 projections (the paper's option B)
rather than zero-padding, so every layer is a convolution that bits can be
allocated to. They are `baq.models.resnet.ResNet` with a small stem and
three stages; the layer names are the same (stem_conv, layer{s}_{b}/conv{1,2},
layer{s}_{b}/downsample_conv, head).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from baq.models import register_model
from baq.models.resnet import ResNet
from baq.quant.inject import Quantizer

DEPTHS = (8, 20, 32, 56)


def cifar_resnet(depth: int, num_classes: int, quant: Optional[Quantizer] = None,
                 **kwargs: Any) -> ResNet:
  """A CIFAR ResNet-`depth` (6n + 2 layers; `width` and other ResNet options apply)."""
  if depth not in DEPTHS:
    raise ValueError(f"Unknown CIFAR ResNet depth {depth}. Valid: {list(DEPTHS)}.")
  n = (depth - 2) // 6
  kw = dict(block="basic", stage_sizes=(n, n, n), width=16, small_stem=True)
  kw.update(kwargs)
  return ResNet(num_classes=num_classes, quant=quant, **kw)


for _depth in DEPTHS:
  register_model(f"resnet{_depth}_cifar")(functools.partial(cifar_resnet, _depth))
