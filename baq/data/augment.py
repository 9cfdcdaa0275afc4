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


def _taps(start: int, extent: int, n: int, reverse: bool = False):
  """The two source pixels of each of `n` samples across `extent` pixels
  (from `start`) and the weight of the second: pixel centres, clamped to
  the extent. Reversed, they sample the mirror image (a flip for free)."""
  c = np.clip((np.arange(n) + 0.5) * extent / n - 0.5, 0, extent - 1)
  lo = np.floor(c).astype(np.int64)
  hi = np.minimum(lo + 1, extent - 1)
  f = (c - lo).astype(np.float32)
  if reverse:
    lo, hi, f = lo[::-1], hi[::-1], f[::-1]
  return start + lo, start + hi, f


def _resize_into(out: np.ndarray, image: np.ndarray, box, hflip: bool = False,
                 vflip: bool = False) -> None:
  """`out` (float32 [H, W, C], contiguous) <- image[box] resized, bilinear.

  Measured against the other ways of doing this (224 px, 64 random crops,
  one core, images/s of the resize alone, a throwaway script on the 2-core
  development machine): a batched take_along_axis 204 (the old version);
  per image, two matmuls with 2-tap interpolation matrices (`Ry @ crop`,
  then the columns) 717, scipy sparse ones 676 (the transposes between the
  passes cost as much as the products); per image, gathers and lerps 1235,
  the fastest, kept here; columns before rows, the same. Grouping images of
  one box (every centre crop) into batched gathers is slower still (548
  against 812 per image on 64 centre crops): one image's temporaries
  (~0.6 MB) stay in cache, a batch's [B, 224, 224, 3] never do.
  Rows first: whole rows of the uint8 image are gathered and cast once;
  columns then gather 4-byte floats through (column, channel) indices, the
  fast path of `np.take`. Every output value is a + (b - a) * f of the same
  operands whatever the batch, so results do not depend on it.
  """
  if not out.flags.c_contiguous:  # the flat view below must write into `out`
    raise ValueError("_resize_into needs a C-contiguous output.")
  top, left, h, w = (int(v) for v in box)
  height, width, ch = out.shape
  y0, y1, fy = _taps(top, h, height, vflip)
  x0, x1, fx = _taps(0, w, width, hflip)
  cols = image[:, left:left + w]
  tall = cols[y0].astype(np.float32).reshape(height, w * ch)
  d = cols[y1].astype(np.float32).reshape(height, w * ch)
  d -= tall
  d *= fy[:, None]
  tall += d  # rows done: [height, w * ch]
  k = np.arange(ch)
  flat = out.reshape(height, width * ch)  # a view: out is contiguous
  np.take(tall, (x0[:, None] * ch + k).ravel(), axis=1, out=flat, mode="clip")
  d = np.take(tall, (x1[:, None] * ch + k).ravel(), axis=1, mode="clip")
  d -= flat
  d *= np.repeat(fx, ch)
  flat += d


def resize_crops(images: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Each image's box (top, left, h, w) cut out and resized to `size`,
  bilinear at pixel centres (samples are clamped to the box, as resizing
  the cut-out crop does).

  Args:
    images: uint8-scale [B, H, W, C].
    boxes: int [B, 4] boxes inside the images.
    size: (height, width) of the result.

  Returns:
    float32 [B, size[0], size[1], C].
  """
  out = np.empty((len(images),) + tuple(size) + images.shape[3:], np.float32)
  for b, box in enumerate(boxes):
    _resize_into(out[b], images[b], box)
  return out


def _scale_about(img: np.ndarray, centre, f) -> None:
  """img = clip((img - centre) * f + centre, 0, 255), in place."""
  img -= centre
  img *= f
  img += centre
  np.clip(img, 0, 255, out=img)


def jitter(img: np.ndarray, rng, recipe: Recipe) -> np.ndarray:
  """The recipe's colour jitter on one float32 [H, W, C] image, in place.

  Args:
    img: the image (overwritten).
    rng: its generator (draws one uniform factor per active jitter).
    recipe: strengths of brightness, contrast and saturation.

  Returns:
    `img`.
  """
  def factor(strength):
    return np.float32(rng.uniform(1 - strength, 1 + strength))

  if recipe.brightness:
    img *= factor(recipe.brightness)
    np.clip(img, 0, 255, out=img)
  if recipe.contrast:
    f = factor(recipe.contrast)
    _scale_about(img, (img @ _GREY).mean(), f)
  if recipe.saturation:
    f = factor(recipe.saturation)
    # The grey repeated over channels: a broadcast [H, W, 1] operand makes
    # numpy loop over 3-long rows, ~3x slower than flat contiguous operands.
    _scale_about(img, np.repeat(img @ _GREY, img.shape[-1]).reshape(img.shape), f)
  return img


def augment(images: np.ndarray, recipe: Recipe, seed: int, step: int,
            positions: Optional[np.ndarray] = None) -> np.ndarray:
  """The recipe applied to batch `step` (uint8-scale [B, H, W, C] in, float32 out).

  One image at a time, from its own generator, in the order crop box,
  horizontal flip, vertical flip, jitter factors; flips are folded into the
  resize's sample positions, and the jitter works in place, so the only
  full-batch array is the result.

  Args:
    images: the batch's images.
    recipe: what to apply.
    seed: the run's seed.
    step: the batch's step.
    positions: each image's position in the global batch (default 0..B-1),
      which seeds its draws.

  Returns:
    float32 [B, H, W, C] in [0, 255].
  """
  positions = np.arange(len(images)) if positions is None else positions
  height, width = images.shape[1:3]
  out = np.empty(images.shape, np.float32)
  for b, i in enumerate(positions):
    rng = np.random.default_rng([seed, step, AUGMENT_STREAM, int(i)])
    box = (crop_box(rng, height, width, recipe.crop_scale, recipe.crop_ratio)
           if recipe.random_resized_crop else None)
    hflip = recipe.hflip and rng.random() < 0.5
    vflip = recipe.vflip and rng.random() < 0.5
    if box is None:
      out[b] = images[b, ::-1 if vflip else 1, ::-1 if hflip else 1]
    else:
      _resize_into(out[b], images[b], box, hflip, vflip)
    jitter(out[b], rng, recipe)
  return out


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
