"""Model registry: each entry builds a Flax module from (config, num_classes, quantizer)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn

from baq.models.cnn import SmallCNN
from baq.quant.inject import Quantizer
from baq.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@MODELS.register("small_cnn")
def _small_cnn(num_classes: int, quant: Optional[Quantizer], **kwargs: Any) -> nn.Module:
  return SmallCNN(num_classes=num_classes, quant=quant, **kwargs)


def build_model(name: str, num_classes: int, quant: Optional[Quantizer] = None,
                **kwargs: Any) -> nn.Module:
  """Builds the registered model `name`.

  Args:
    name: registry name (unknown names raise, listing the valid ones).
    num_classes: number of output logits.
    quant: quantization factory, or None for the float baseline.
    **kwargs: model-specific options from `config.model_kwargs`.

  Returns:
    An (unbound) Flax module.
  """
  return MODELS.get(name)(num_classes, quant, **kwargs)
