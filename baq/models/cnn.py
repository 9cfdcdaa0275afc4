"""A small convolutional classifier, the default model for the embedded data.

Like every baq model it takes an optional `Quantizer`; with None it is the
float baseline, and with a quantizer every Conv/Dense gets fake quantization
injected without a line of quantization code here. Registered as "small_cnn"
(no pretrained weights, so no converter).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from baq.models import register_model
from baq.models.layers import float32_logits, max_pool
from baq.quant.inject import Conv, Dense, Quantizer


class SmallCNN(nn.Module):
  """Conv(3x3) blocks with max-pooling, global average pooling and an MLP head.

  Attributes:
    num_classes: number of output logits.
    widths: channels of the conv blocks; every block but the last is pooled.
    hidden: width of the hidden dense layer (0 for none).
    stem_stride: stride of the first conv (2 runs 64x64 images at the cost of
      32x32 ones; the parameters do not change).
    quant: quantization factory, or None for the float model.
    dtype: compute dtype of the layers (parameters stay float32).
  """

  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  hidden: int = 64
  stem_stride: int = 1
  quant: Optional[Quantizer] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv, dense = Conv(self.quant, self.dtype), Dense(self.quant, self.dtype)
    for i, w in enumerate(self.widths):
      strides = (self.stem_stride,) * 2 if i == 0 else 1
      x = nn.relu(conv(w, (3, 3), strides=strides)(x))
      if i < len(self.widths) - 1:
        x = max_pool(x, (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2))
    if self.hidden:
      x = nn.relu(dense(self.hidden)(x))
    return float32_logits(dense(self.num_classes, name="head")(x))


@register_model("small_cnn", size_options=lambda size: dict(widths=(32, 64, 128), hidden=128))
def small_cnn(num_classes: int, quant: Optional[Quantizer] = None, **kwargs: Any) -> SmallCNN:
  """The small CNN.

  Args:
    num_classes: number of output logits.
    quant: quantization factory, or None for the float model.
    **kwargs: overrides of `SmallCNN` attributes (`widths`, `hidden`, ...).

  Returns:
    An unbound `SmallCNN`.
  """
  return SmallCNN(num_classes=num_classes, quant=quant, **kwargs)
