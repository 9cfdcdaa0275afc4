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


# The papers' architectures; imported on first use to keep `import baq` light.
@MODELS.register("resnet18")
def _resnet18(num_classes: int, quant: Optional[Quantizer], **kwargs: Any) -> nn.Module:
  from baq.models import resnet  # pylint: disable=g-import-not-at-top
  return resnet.resnet18(num_classes, quant, **kwargs)


@MODELS.register("resnet50")
def _resnet50(num_classes: int, quant: Optional[Quantizer], **kwargs: Any) -> nn.Module:
  from baq.models import resnet  # pylint: disable=g-import-not-at-top
  return resnet.resnet50(num_classes, quant, **kwargs)


@MODELS.register("deit_tiny")
def _deit_tiny(num_classes: int, quant: Optional[Quantizer], **kwargs: Any) -> nn.Module:
  from baq.models import vit  # pylint: disable=g-import-not-at-top
  return vit.DeiT(num_classes=num_classes, quant=quant, **kwargs)


@MODELS.register("tinyvit_5m")
def _tinyvit_5m(num_classes: int, quant: Optional[Quantizer], **kwargs: Any) -> nn.Module:
  from baq.models import tinyvit  # pylint: disable=g-import-not-at-top
  return tinyvit.TinyViT(num_classes=num_classes, quant=quant, **kwargs)
