"""A SYNTHETIC dermatology-like image set whose difficulty depends on skin tone.

Nothing here is real patient data. Each image is rendered, in vectorised
numpy, from an explicit per-lesion parameter record (`LesionParams`: class,
shape, border, texture, position, size and nuisance) plus a skin colour in
CIELAB. Keeping lesion and skin apart is the point of the design: the same
lesion can be rendered on any skin type, which gives the counterfactual pairs
that fairness-aware calibration needs.

Skin tone defines six groups, Fitzpatrick types I-VI (ids 0..5), drawn in
Fitzpatrick17k's proportions. A skin colour is drawn inside its type's band of
individual typology angle, ITA = atan((L* - 50) / b*) in degrees. Lesion-to-skin
contrast falls as the skin darkens, so on the darkest types the class is carried
by small intensity differences: a cue that needs precise weights, which is what
lets weight quantization widen the worst-group gap.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from baq.data.synthetic.render import (BLOB_TINTS, HARMONICS, NUM_BLOBS, NUM_DOTS,
                             NUM_HAIRS, contrast, ita, lab_to_srgb,
                             lesion_mask, render, srgb_to_lab)

__all__ = [
    "CLASS_NAMES", "GROUP_NAMES", "GROUP_PROBS", "ITA_BANDS", "SPLITS",
    "LesionParams", "contrast", "counterfactuals", "generate", "ita",
    "lab_to_srgb", "lesion_mask", "render", "sample_lesions",
    "sample_records", "sample_skin", "srgb_to_lab",
]

GROUP_NAMES = ("I", "II", "III", "IV", "V", "VI")
# Fitzpatrick17k's skin-type proportions (they sum to 100.1, hence the divide).
GROUP_PROBS = np.array([18.4, 30.0, 20.7, 17.4, 9.6, 4.0]) / 100.1
CLASS_NAMES = ("benign", "malignant", "non_neoplastic")
CLASS_PROBS = np.array([0.45, 0.25, 0.30])
# ITA bands in degrees. Type I is capped at 70 and VI at -60 because beyond
# them no L* in [L_RANGE] with b* in [B_RANGE] reaches the angle.
ITA_BANDS = np.array([[55, 70], [41, 55], [28, 41], [10, 28], [-30, 10],
                      [-60, -30]], np.float64)
L_RANGE = (22.0, 85.0)
B_RANGE = (10.0, 25.0)
SPLITS = ("train", "validation", "test")


class LesionParams(NamedTuple):
  """Everything about a lesion except the skin; every field has leading dim n.

  Positions and sizes are in unit coordinates (the image spans [-1, 1]), so
  one record renders at any image size.
  """
  label: np.ndarray        # int32 class id.
  center: np.ndarray       # [n, 2] lesion centre (x, y).
  radius: np.ndarray       # mean radius.
  aspect: np.ndarray       # minor / major axis ratio.
  angle: np.ndarray        # orientation in radians.
  harm_amp: np.ndarray     # [n, len(HARMONICS)] relative border amplitudes.
  harm_phase: np.ndarray   # [n, len(HARMONICS)]
  softness: np.ndarray     # border width relative to the radius.
  ring: np.ndarray         # inner/outer radius of an annulus; 0 means filled.
  patchy: np.ndarray       # how much low-frequency noise eats the lesion.
  tint: np.ndarray         # [n, 3] base Lab shift at full contrast.
  variegation: np.ndarray  # strength of the coloured blobs.
  blob_pos: np.ndarray     # [n, B, 2] blob offsets relative to the radius.
  blob_kind: np.ndarray    # [n, B] int index into BLOB_TINTS.
  dots: np.ndarray         # strength of dark dots.
  dot_pos: np.ndarray      # [n, D, 2] dot offsets relative to the radius.
  scale: np.ndarray        # strength of the fine whitish scale pattern.
  seed: np.ndarray         # uint32; drives texture and sensor noise hashes.
  hair_on: np.ndarray      # [n, H] 0/1.
  hair_geom: np.ndarray    # [n, H, 5] angle, offset, curvature, extent, width.
  light: np.ndarray        # [n, 3] per-channel gain in linear RGB.
  blur: np.ndarray         # Gaussian sigma as a fraction of the image size.
  noise: np.ndarray        # sensor noise std on the [0, 1] scale.

  def take(self, idx) -> "LesionParams":
    """Returns the records at `idx` (any numpy index)."""
    return LesionParams(*(np.asarray(f)[idx] for f in self))


def sample_lesions(n: int, rng: np.random.Generator) -> LesionParams:
  """Draws `n` lesion records, classes in `CLASS_PROBS`, independent of skin.

  Classes overlap on purpose (a regular malignant lesion, an irregular naevus)
  so that even on light skin a small CNN does not saturate.

  Args:
    n: number of lesions.
    rng: numpy generator; the draws are a pure function of its state.

  Returns:
    A `LesionParams` with leading dimension `n`.
  """
  label = rng.choice(3, n, p=CLASS_PROBS).astype(np.int32)
  mal, non = label == 1, label == 2
  u = lambda *shape: rng.random((n,) + shape, np.float32)
  # One latent, atypia, drives irregularity, variegation, dots and border
  # blur. Benign and malignant draws overlap (Beta(2, 4.5) vs Beta(4.5, 2)
  # cross at 0.5 with 14% of each beyond it), so some lesions look like the
  # other class however high the contrast: light skin cannot saturate.
  atypia = np.where(mal, rng.beta(4.5, 2, n), rng.beta(2, 4.5, n))
  # Inflammation makes non-neoplastic lesions red, pale, scaly and patchy;
  # its low tail looks like a faint naevus.
  inflam = np.where(non, rng.beta(3, 1.5, n), 0)
  harm_amp = (0.01 + 0.2 * atypia[:, None]) * u(len(HARMONICS))
  harm_amp[:, 0] *= 2 * atypia                  # Lopsided outline.
  harm_amp[:, 6:] *= 0.1 + 0.5 * atypia[:, None]  # Ragged edge.
  ring = np.where(non & (u() < 0.4), 0.45 + 0.25 * u(), 0)
  tint = np.stack([-28 - 14 * u() + 18 * inflam, 3 + 5 * u() + 14 * inflam,
                   7 + 7 * u() - 8 * inflam], -1)
  hair_on = (u(1) < 0.45) & (u(NUM_HAIRS) < 0.6)
  hair_geom = np.stack([np.pi * u(NUM_HAIRS), 1.8 * u(NUM_HAIRS) - 0.9,
                        1.2 * u(NUM_HAIRS) - 0.6, 0.5 + u(NUM_HAIRS),
                        0.02 + 0.02 * u(NUM_HAIRS)], -1)
  f32 = lambda x: np.asarray(x, np.float32)
  return LesionParams(
      label=label,
      center=0.5 * u(2) - 0.25,
      radius=f32(0.22 + 0.3 * u() + 0.08 * atypia + 0.08 * non),
      aspect=f32(1 - 0.3 * u() * (0.5 + atypia)),
      angle=np.pi * u(),
      harm_amp=f32(harm_amp),
      harm_phase=2 * np.pi * u(len(HARMONICS)),
      softness=f32(0.03 + 0.15 * atypia * (0.5 + u()) + 0.15 * inflam),
      ring=f32(ring),
      patchy=f32(np.where(non & (ring == 0), inflam * (0.3 + 0.6 * u()), 0)),
      tint=f32(tint),
      variegation=f32(atypia**1.5 * (0.3 + 0.9 * u())),
      blob_pos=1.2 * u(NUM_BLOBS, 2) - 0.6,
      blob_kind=rng.integers(0, len(BLOB_TINTS), (n, NUM_BLOBS), np.int32),
      dots=f32(np.clip(2 * (atypia - 0.45) + 0.3 * rng.normal(size=n), 0, 1)),
      dot_pos=2.2 * u(NUM_DOTS, 2) - 1.1,
      scale=f32(inflam * u()),
      seed=rng.integers(0, 2**32, n, dtype=np.uint32),
      hair_on=f32(hair_on),
      hair_geom=f32(hair_geom),
      light=f32((0.8 + 0.35 * u(1)) * rng.normal(1, .04, (n, 3))),
      blur=f32(0.035 * u() * (u() < 0.6)),
      noise=f32((1.5 + 4.5 * u()) / 255),
  )


def sample_skin(skin_types, rng: np.random.Generator) -> np.ndarray:
  """Draws a CIELAB skin colour inside each skin type's ITA band.

  ITA is uniform in the band; b* is uniform over the part of `B_RANGE` that
  keeps L* = 50 + b* tan(ITA) inside `L_RANGE`; a* is uniform in [8, 15].

  Args:
    skin_types: int array of Fitzpatrick type ids in 0..5.
    rng: numpy generator.

  Returns:
    float32 [n, 3] (L*, a*, b*).
  """
  skin_types = np.asarray(skin_types)
  lo, hi = ITA_BANDS[skin_types].T
  tan = np.tan(np.deg2rad(lo + rng.random(len(skin_types)) * (hi - lo)))
  with np.errstate(divide="ignore"):
    b_max = np.where(tan > 0, (L_RANGE[1] - 50) / tan,
                     np.where(tan < 0, (L_RANGE[0] - 50) / tan, np.inf))
  b_star = B_RANGE[0] + rng.random(len(skin_types)) * (
      np.minimum(B_RANGE[1], b_max) - B_RANGE[0])
  a_star = rng.uniform(8, 15, len(skin_types))
  return np.stack([50 + b_star * tan, a_star, b_star], -1).astype(np.float32)


def sample_records(n: int, seed) -> tuple[np.ndarray, LesionParams, np.ndarray]:
  """Draws (skin types, lesions, skin colours) from `np.random.default_rng(seed)`.

  `seed` may be an int or a sequence such as `(seed, split_id)`.
  """
  rng = np.random.default_rng(seed)
  groups = rng.choice(len(GROUP_PROBS), n, p=GROUP_PROBS).astype(np.int32)
  lesions = sample_lesions(n, rng)
  return groups, lesions, sample_skin(groups, rng)


def generate(n: int, seed, image_size: int = 32, nuisance: bool = True) -> dict:
  """Generates n SYNTHETIC images; a pure function of (n, seed, image_size).

  Args:
    n: number of examples.
    seed: int or sequence of ints for `np.random.default_rng`.
    image_size: height and width in pixels.
    nuisance: whether to add hair, lighting, blur and sensor noise.

  Returns:
    dict with `image` uint8 [n, H, W, 3], `label` int32 [n], `group` int32 [n]
    (Fitzpatrick type id), `skin_lab` float32 [n, 3] and `lesions`.
  """
  groups, lesions, skin = sample_records(n, seed)
  return dict(image=render(lesions, skin, image_size, nuisance),
              label=lesions.label, group=groups, skin_lab=skin, lesions=lesions)


def counterfactuals(lesions: LesionParams, skin_types: Sequence[int],
                    seed: int = 0, image_size: int = 32,
                    nuisance: bool = True) -> dict:
  """Renders the same lesions, with the same nuisances, on other skin types.

  Args:
    lesions: n lesion records (e.g. `generate(...)['lesions']`).
    skin_types: T Fitzpatrick type ids to render every lesion on.
    seed: seeds the skin colours, drawn per type from `default_rng([seed, t])`.
    image_size: height and width in pixels.
    nuisance: whether to add hair, lighting, blur and sensor noise.

  Returns:
    dict with `image` uint8 [T, n, H, W, 3], `skin_lab` float32 [T, n, 3],
    `label` int32 [n] and `group` int32 [T].
  """
  n = len(lesions.label)
  skins = np.stack([sample_skin(np.full(n, t), np.random.default_rng([seed, t]))
                    for t in skin_types])
  images = np.stack([render(lesions, s, image_size, nuisance) for s in skins])
  return dict(image=images, skin_lab=skins, label=lesions.label,
              group=np.asarray(skin_types, np.int32))
