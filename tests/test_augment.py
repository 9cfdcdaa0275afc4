"""Augmentation: references for the crop, resize and jitter; determinism per example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.data import augment as aug
from baq.data.datasets import Split
from baq.data.pipeline import Batcher, recipe


def _images(n=6, h=20, w=24, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3)).astype(np.uint8)


def test_resize_of_a_crop_is_bilinear_at_pixel_centres():
  """Against jax.image.resize (linear, no antialiasing: the same half-pixel
  convention), for up- and down-scaled crops."""
  imgs = _images()
  boxes = np.array([[0, 0, 20, 24], [3, 5, 10, 12], [7, 2, 13, 20], [0, 4, 5, 7],
                    [2, 2, 16, 16], [10, 11, 10, 13]])
  got = aug.resize_crops(imgs, boxes, (17, 9))
  for img, (t, l, h, w), g in zip(imgs, boxes, got):
    crop = jnp.asarray(img[t:t + h, l:l + w], jnp.float32)
    want = jax.image.resize(crop, (17, 9, 3), "linear", antialias=False)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-3)
  # The whole image at its own size is the image.
  np.testing.assert_array_equal(aug.resize_crops(imgs, np.array([[0, 0, 20, 24]] * 6),
                                                 (20, 24)), imgs.astype(np.float32))


def test_crop_boxes_follow_the_scale_and_ratio_bounds():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    t, l, h, w = aug.crop_box(rng, 224, 224, (0.3, 0.9), (3 / 4, 4 / 3))
    assert 0 <= t and t + h <= 224 and 0 <= l and l + w <= 224
    areas.append(h * w / 224**2)
    ratios.append(w / h)
  assert 0.29 < min(areas) and max(areas) < 0.91
  assert 0.74 < min(ratios) and max(ratios) < 1.35
  # Square crops always fit, so their area fraction is uniform on its range
  # (torchvision's rule; other ratios reject some large crops).
  sq = [np.prod(aug.crop_box(rng, 224, 224, (0.3, 0.9), (1.0, 1.0))[2:]) / 224**2
        for _ in range(2000)]
  assert abs(np.mean(sq) - 0.6) < 0.01
  # When no crop fits (a ratio no box of the image can have), the fallback is centred.
  assert aug.crop_box(rng, 10, 100, (1.0, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)


def test_jitter_factors_act_as_written():
  imgs = _images(n=4).astype(np.float32)
  f = np.array([np.random.default_rng(i).uniform(0.5, 1.5) for i in range(4)], np.float32)

  def jitter(recipe, rngs):  # in place: on copies
    return np.stack([aug.jitter(im.copy(), r, recipe) for im, r in zip(imgs, rngs)])
  got = jitter(aug.Recipe(brightness=0.5), [np.random.default_rng(i) for i in range(4)])
  np.testing.assert_allclose(got, np.clip(imgs * f[:, None, None, None], 0, 255), rtol=1e-6)
  # Saturation 0 factor turns every pixel to its grey (here forced by a 1-strength draw of 0).
  grey = imgs @ np.array([0.299, 0.587, 0.114], np.float32)
  out = jitter(aug.Recipe(saturation=1.0), [_Fixed(0.0)] * 4)
  np.testing.assert_allclose(out, np.repeat(grey[..., None], 3, -1), rtol=1e-5, atol=1e-3)
  # Contrast 0 factor: every pixel at the image's mean grey.
  out = jitter(aug.Recipe(contrast=1.0), [_Fixed(0.0)] * 4)
  np.testing.assert_allclose(out, np.broadcast_to(grey.mean((1, 2))[:, None, None, None],
                                                  imgs.shape), rtol=1e-5)


class _Fixed:
  """A generator whose uniform draws are always `v`."""

  def __init__(self, v):
    self.v = v

  def uniform(self, lo, hi):
    return self.v


def _split(n=40):
  imgs = _images(n=n, h=16, w=16)
  return Split(imgs, np.arange(n) % 2, np.arange(n) % 3, 2, 3, ("a", "b"), ("x", "y", "z"), "t")


def test_each_examples_augmentation_depends_only_on_seed_step_and_position():
  split, r = _split(), aug.PAPER_RECIPE
  a = Batcher(split, 8, seed=3, augment=r).batch(5)
  b = Batcher(split, 8, seed=3, augment=r).batch(5)  # a resumed run: a new batcher
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], Batcher(split, 8, seed=3, augment=r).batch(6)["image"])
  assert not np.array_equal(a["image"], Batcher(split, 8, seed=4, augment=r).batch(5)["image"])
  # An example's pixels do not depend on the other examples of the batch.
  imgs = split.images[:8]
  full = aug.augment(imgs, r, 3, 5)
  other = aug.augment(np.concatenate([imgs[:4], imgs[::-1][:4]]), r, 3, 5)
  np.testing.assert_array_equal(full[:4], other[:4])
  assert full.dtype == np.float32 and full.min() >= 0 and full.max() <= 255


def test_no_recipe_or_an_inactive_one_leaves_the_batches_unchanged():
  split = _split()
  plain = Batcher(split, 8, seed=1).batch(2)["image"]
  np.testing.assert_array_equal(Batcher(split, 8, seed=1, augment=aug.Recipe()).batch(2)["image"],
                                plain)


def test_center_crop_is_the_middle_resized_back():
  imgs = _images(n=2, h=16, w=16)
  np.testing.assert_array_equal(aug.center_crop(imgs, None), imgs)
  got = aug.center_crop(imgs, 0.5)
  want = aug.resize_crops(imgs, np.array([[4, 4, 8, 8]] * 2), (16, 16))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("option,value,match", [
    ("crop_scale", (0.5, 0.2), "crop_scale"), ("crop_scale", (0.0, 1.0), "crop_scale"),
    ("brightness", 1.5, "brightness"), ("crop_ratio", (2.0, 1.0), "crop_ratio")])
def test_impossible_recipes_are_refused(option, value, match):
  with pytest.raises(ValueError, match=match):
    aug.Recipe(**{option: value})


def test_config_section_to_recipe_and_unknown_options(make_tiny_config):
  from baq.experiment import checks as validate  # pylint: disable=import-outside-toplevel
  c = make_tiny_config(**{"dataset.augment.random_resized_crop": True,
                          "dataset.augment.crop_scale": (0.5, 1.0)})
  assert recipe(c.dataset) == aug.Recipe(random_resized_crop=True, crop_scale=(0.5, 1.0))
  with c.unlocked():
    c.dataset.augment.rotate = 10
  with pytest.raises(KeyError, match="rotate.*Valid: brightness"):
    validate.validate(c)
  c = make_tiny_config(**{"dataset.eval_center_crop": 1.5})
  with pytest.raises(ValueError, match="eval_center_crop=1.5"):
    validate.validate(c)


# The batched numpy implementation this module had before it worked one image
# at a time (take_along_axis gathers over the whole batch): the reference the
# faster one must match to 1e-3 on the uint8 scale.
def _old_resize_crops(images, boxes, size):
  def coords(start, extent, n):
    c = (np.arange(n)[None, :] + 0.5) * extent[:, None] / n - 0.5
    c = np.clip(c, 0, extent[:, None] - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, extent[:, None] - 1)
    return start[:, None] + lo, start[:, None] + hi, (c - lo).astype(np.float32)
  y0, y1, fy = coords(boxes[:, 0], boxes[:, 2], size[0])
  x0, x1, fx = coords(boxes[:, 1], boxes[:, 3], size[1])
  img = images.astype(np.float32)
  rows = lambda y: np.take_along_axis(img, y[:, :, None, None], axis=1)  # noqa: E731
  fy = fy[:, :, None, None]
  tall = rows(y0) * (1 - fy) + rows(y1) * fy
  cols = lambda x: np.take_along_axis(tall, x[:, None, :, None], axis=2)  # noqa: E731
  fx = fx[:, None, :, None]
  return cols(x0) * (1 - fx) + cols(x1) * fx


def _old_augment(images, recipe, seed, step):
  rngs = [np.random.default_rng([seed, step, aug.AUGMENT_STREAM, i]) for i in range(len(images))]
  height, width = images.shape[1:3]
  img = images.astype(np.float32)
  if recipe.random_resized_crop:
    boxes = np.array([aug.crop_box(r, height, width, recipe.crop_scale, recipe.crop_ratio)
                      for r in rngs])
    img = _old_resize_crops(images, boxes, (height, width))
  for axis, on in ((2, recipe.hflip), (1, recipe.vflip)):
    if on:
      flip = np.array([r.random() < 0.5 for r in rngs])
      img = np.where(flip[:, None, None, None], np.flip(img, axis), img)
  grey = np.array([0.299, 0.587, 0.114], np.float32)
  def factors(strength):
    return np.array([r.uniform(1 - strength, 1 + strength) for r in rngs],
                    np.float32)[:, None, None, None]
  if recipe.brightness:
    img = np.clip(img * factors(recipe.brightness), 0, 255)
  if recipe.contrast:
    mean = (img @ grey).mean(axis=(1, 2))[:, None, None, None]
    img = np.clip((img - mean) * factors(recipe.contrast) + mean, 0, 255)
  if recipe.saturation:
    g = (img @ grey)[..., None]
    img = np.clip((img - g) * factors(recipe.saturation) + g, 0, 255)
  return img


@pytest.mark.parametrize("recipe", [
    aug.PAPER_RECIPE, aug.Recipe(hflip=True, vflip=True), aug.Recipe(contrast=0.5),
    aug.Recipe(random_resized_crop=True, crop_scale=(0.01, 0.05), crop_ratio=(0.2, 5.0),
               vflip=True, saturation=0.9)])
def test_augment_matches_the_batched_reference(recipe):
  imgs = _images(n=12, h=40, w=36, seed=1)
  for step in (0, 7):
    got = aug.augment(imgs, recipe, 5, step)
    want = _old_augment(imgs, recipe, 5, step)
    assert got.dtype == np.float32 and got.shape == imgs.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
  boxes = np.array([[0, 0, 40, 36], [1, 2, 3, 4], [10, 0, 30, 36], [0, 35, 40, 1]] * 3)
  for size in ((40, 36), (7, 50)):
    np.testing.assert_allclose(aug.resize_crops(imgs, boxes, size),
                               _old_resize_crops(imgs, boxes, size), rtol=0, atol=1e-3)
  np.testing.assert_allclose(aug.center_crop(imgs, 0.875), _old_resize_crops(
      imgs, np.array([[2, 2, 35, 32]] * 12), (40, 36)), rtol=0, atol=1e-3)
