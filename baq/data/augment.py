"""Image augmentation as deterministic numpy functions of (seed, step, example).

The training recipes of the papers (random-resized crop, flips, colour
jitter) and centre-crop evaluation, on uint8-scale images [B, H, W, C].
Every random choice of batch `step` comes from
`np.random.default_rng([seed, step, AUGMENT_STREAM, i])` for the example in
position i of the batch, so an example's augmentation depends on nothing
else: a resumed run, or a batch cut differently across hosts, sees the same
pixels.

  * random-resized crop (torchvision's `RandomResizedCrop`): an area
    fraction drawn uniformly from `crop_scale` and a log-uniform aspect
    ratio from `crop_ratio`, up to 10 tries for a crop that fits, else the
    largest centred crop of a clamped ratio; resized back to the image size
    with bilinear interpolation at pixel centres;
  * horizontal and vertical flips, each with probability 1/2;
  * colour jitter: brightness, contrast and saturation factors drawn
    uniformly from [1 - s, 1 + s], applied in that order (contrast about the
    image's mean grey, saturation about each pixel's grey), clipped to
    [0, 255];
  * centre crop (evaluation): the central `fraction` of each side, resized
    back to the image size (the analogue of resize-then-centre-crop for
    images stored at the model's size).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

AUGMENT_STREAM = 3  # seed word of the augmentation streams (the batcher uses 1 and 2)
_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as torchvision


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One training augmentation recipe (see the module docstring)."""
  random_resized_crop: bool = False
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = False
  vflip: bool = False
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1.")
    if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
      raise ValueError(f"crop_ratio={self.crop_ratio} must satisfy 0 < low <= high.")
    for k in ("brightness", "contrast", "saturation"):
      if not 0 <= getattr(self, k) <= 1:
        raise ValueError(f"{k}={getattr(self, k)} must lie in [0, 1].")

  @property
  def active(self) -> bool:
    return (self.random_resized_crop or self.hflip or self.vflip or
            bool(self.brightness or self.contrast or self.saturation))


# The usual fine-tuning recipe at 224 px (torchvision's RandomResizedCrop
# defaults, both flips as dermatology images have no orientation, mild
# colour jitter); evaluated with `dataset.eval_center_crop = 0.875`
# (resize 256, centre crop 224).
PAPER_RECIPE = Recipe(random_resized_crop=True, hflip=True, vflip=True, brightness=0.2,
                      contrast=0.2, saturation=0.2)


def crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) of one random-resized crop, torchvision's rule."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height  # the fallback: a centred crop of the clamped ratio
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resize_crops(images: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Each image's box (top, left, h, w) cut out and resized to `size`,
  bilinear at pixel centres (samples are clamped to the box, as resizing
  the cut-out crop does).

  Returns float32 [B, size[0], size[1], C].
  """
  def coords(start, extent, n):  # sample positions, clamped to the crop's own pixels
    c = (np.arange(n)[None, :] + 0.5) * extent[:, None] / n - 0.5
    c = np.clip(c, 0, extent[:, None] - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, extent[:, None] - 1)
    return start[:, None] + lo, start[:, None] + hi, (c - lo).astype(np.float32)

  y0, y1, fy = coords(boxes[:, 0], boxes[:, 2], size[0])
  x0, x1, fx = coords(boxes[:, 1], boxes[:, 3], size[1])
  img = images.astype(np.float32)
  # Separable: rows first ([B, size0, W, C]), then columns.
  rows = lambda y: np.take_along_axis(img, y[:, :, None, None], axis=1)  # noqa: E731
  fy = fy[:, :, None, None]
  tall = rows(y0) * (1 - fy) + rows(y1) * fy
  cols = lambda x: np.take_along_axis(tall, x[:, None, :, None], axis=2)  # noqa: E731
  fx = fx[:, None, :, None]
  return cols(x0) * (1 - fx) + cols(x1) * fx


def _jitter(img: np.ndarray, rngs, recipe: Recipe) -> np.ndarray:
  def factors(strength):
    return np.array([r.uniform(1 - strength, 1 + strength) for r in rngs],
                    np.float32)[:, None, None, None]
  if recipe.brightness:
    img = np.clip(img * factors(recipe.brightness), 0, 255)
  if recipe.contrast:
    mean = (img @ _GREY).mean(axis=(1, 2))[:, None, None, None]
    img = np.clip((img - mean) * factors(recipe.contrast) + mean, 0, 255)
  if recipe.saturation:
    grey = (img @ _GREY)[..., None]
    img = np.clip((img - grey) * factors(recipe.saturation) + grey, 0, 255)
  return img


def augment(images: np.ndarray, recipe: Recipe, seed: int, step: int,
            positions: Optional[np.ndarray] = None) -> np.ndarray:
  """The recipe applied to batch `step` (uint8-scale [B, H, W, C] in, float32 out).

  `positions`: each image's position in the global batch (default 0..B-1),
  which seeds its draws.
  """
  positions = np.arange(len(images)) if positions is None else positions
  rngs = [np.random.default_rng([seed, step, AUGMENT_STREAM, int(i)]) for i in positions]
  height, width = images.shape[1:3]
  if recipe.random_resized_crop:
    boxes = np.array([crop_box(r, height, width, recipe.crop_scale, recipe.crop_ratio)
                      for r in rngs])
    img = resize_crops(images, boxes, (height, width))
  else:
    img = images.astype(np.float32)
  for axis, on in ((2, recipe.hflip), (1, recipe.vflip)):
    if on:
      flip = np.array([r.random() < 0.5 for r in rngs])
      img = np.where(flip[:, None, None, None], np.flip(img, axis), img)
  return _jitter(img, rngs, recipe)


def center_crop(images: np.ndarray, fraction: Optional[float]) -> np.ndarray:
  """The central `fraction` of each side, resized back (None or 1: unchanged)."""
  if fraction is None or fraction == 1:
    return images
  if not 0 < fraction <= 1:
    raise ValueError(f"center crop fraction={fraction} must lie in (0, 1].")
  height, width = images.shape[1:3]
  h, w = max(1, int(round(height * fraction))), max(1, int(round(width * fraction)))
  box = np.array([[(height - h) // 2, (width - w) // 2, h, w]] * len(images))
  return resize_crops(images, box, (height, width))
