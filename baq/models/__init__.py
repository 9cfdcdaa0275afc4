"""Model registry: one file per family registers its builder, size options and converter.

Each non-underscore module of this package is imported on the first lookup
(`Registry(discover=...)`), so a new family is one new file here that calls
`register_model`; a family outside baq is one module named in
`config.imports`. `layers.py` holds the layers families share and
`convert.py` the generic weight-conversion machinery; neither lists models.

    @register_model("resnet18", converter=TORCHVISION_RESNET)
    def resnet18(num_classes, quant, **kwargs): ...

`build_model(..., dtype="bfloat16")` builds a family in mixed precision
(`COMPUTE_DTYPES`, `config.model.dtype`): the family's `dtype` attribute,
which baq's families hand to every layer (see `layers.py`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from baq.quant.inject import Quantizer
from baq.registry import Registry

if TYPE_CHECKING:
  from baq.models.convert import KeyRules


def no_size_options(image_size: int) -> dict:
  """Size options of a family whose defaults fit every image size: none."""
  del image_size
  return {}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """What a family registers under one model name.

  Attributes:
    build: `build(num_classes, quant, **kwargs) -> nn.Module` (unbound).
    size_options: `size_options(image_size) -> dict` of builder kwargs that
      suit that image size (configs/papers.py uses them).
    converter: the `KeyRules` mapping pretrained PyTorch names onto the
      module, or None when the family has no pretrained weights.
  """

  build: Callable[..., nn.Module]
  size_options: Callable[[int], dict] = no_size_options
  converter: Optional["KeyRules"] = None


MODELS: Registry[ModelEntry] = Registry("model", discover="baq.models")

# Compute dtypes of the image models (`config.model.dtype`). Parameters stay
# float32 in all of them; see `baq/models/layers.py` for what runs in which.
COMPUTE_DTYPES: Registry[Any] = Registry("compute dtype")
COMPUTE_DTYPES.register("float32")(jnp.float32)
COMPUTE_DTYPES.register("bfloat16")(jnp.bfloat16)
# What every family computes in when built without the option, so a family
# with no `dtype` attribute (a plug-in's) builds at it.
DEFAULT_DTYPE = "float32"


def register_model(name: str, *, size_options: Optional[Callable[[int], dict]] = None,
                   converter: Optional["KeyRules"] = None
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Decorator registering a builder, with its size options and converter, as `name`.

  Args:
    name: the model's registry name (`config.model.name`).
    size_options: image size -> builder kwargs; None for no options.
    converter: `KeyRules` for pretrained weights, or None if there are none.

  Returns:
    A decorator that registers the builder and returns it unchanged.
  """

  def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    MODELS.register(name)(ModelEntry(build, size_options or no_size_options, converter))
    return build

  return wrap


def build_model(name: str, num_classes: int, quant: Optional[Quantizer] = None,
                dtype: str = DEFAULT_DTYPE, **kwargs: Any) -> nn.Module:
  """Builds the registered model `name`.

  Args:
    name: registry name (unknown names raise, listing the valid ones).
    num_classes: number of output logits.
    quant: quantization factory, or None for the float baseline.
    dtype: a `COMPUTE_DTYPES` name (`config.model.dtype`); unknown names
      raise, listing the valid ones.
    **kwargs: model-specific options from `config.model.kwargs`.

  Returns:
    An (unbound) Flax module.
  """
  entry, compute = MODELS.get(name), COMPUTE_DTYPES.get(dtype)
  if dtype != DEFAULT_DTYPE:
    kwargs["dtype"] = compute
  return entry.build(num_classes, quant, **kwargs)


def size_options(name: str, image_size: int) -> dict:
  """The builder kwargs that model `name` wants for square images of `image_size`.

  Args:
    name: registry name (unknown names raise, listing the valid ones).
    image_size: side of the images.

  Returns:
    A fresh dict of keyword arguments for `build_model`.
  """
  return dict(MODELS.get(name).size_options(image_size))


def get_converter(name: str) -> "KeyRules":
  """The weight converter (`KeyRules`) of model `name`.

  Args:
    name: registry name of a model with pretrained weights.

  Returns:
    Its `KeyRules`.

  Raises:
    KeyError: `name` is unknown or has no converter; the message lists the
      names that have one.
  """
  entry = MODELS.get(name) if name in MODELS else None
  if entry is None or entry.converter is None:
    valid = ", ".join(n for n in MODELS.names() if MODELS.get(n).converter is not None)
    what = "Unknown converter" if entry is None else "No converter for model"
    raise KeyError(f"{what} {name!r}. Valid converter names: {valid or '(none registered)'}.")
  return entry.converter
