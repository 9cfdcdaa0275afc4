"""A SYNTHETIC image-caption set for the vision-language bias study.

Nothing here is real patient data. Images, lesion classes and skin types come
from baq's renderer (`baq.data.synthetic.generate`): lesions of the
renderer's classes (benign, malignant, non_neoplastic) drawn on Fitzpatrick
skin types I-VI, with contrast falling as the skin darkens. Each image gets
a caption naming its class from one of `TEMPLATES` ("a dermoscopic image of
a malignant lesion", ...); `class_prompts` holds every template for every
class, for zero-shot classification (average a class's prompt embeddings,
or use one template); `NEUTRAL_QUERIES` name no class and no skin type
("a dermoscopic image of a lesion", "a photo of skin", ...), for retrieval
skew over skin types: a fair model ranks the skin types of the gallery in
their gallery proportions.

The set is a pure function of (seed, n, image_size, nuisance). Images are
drawn from `default_rng([seed, 10])`, a stream apart from the synthetic
dermatology set's splits (`[seed, 0..2]`), so the two sets never share an
image; caption templates from `default_rng([seed, 11])`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from baq.data.synthetic import generate as synth

# How a caption names each renderer class (`synth.CLASS_NAMES` order).
CLASS_PHRASES = {"benign": "benign", "malignant": "malignant",
                 "non_neoplastic": "non-neoplastic"}
TEMPLATES = (
    "a dermoscopic image of a {} lesion",
    "a close-up photo of a {} skin lesion",
    "a dermatology image showing a {} lesion",
    "a clinical photo of a {} lesion on the skin",
)
NEUTRAL_QUERIES = (
    "a dermoscopic image of a lesion",
    "a photo of skin",
    "a close-up photo of a skin lesion",
    "a dermatology image",
    "a clinical photo of a mole",
    "a photo of a patient's skin",
)
_IMAGE_STREAM, _CAPTION_STREAM = 10, 11


@dataclasses.dataclass
class SyntheticVLM:
  """A SYNTHETIC image-caption set (see the module docstring)."""
  images: np.ndarray        # uint8 [n, H, W, 3]
  labels: np.ndarray        # int32 [n] class id, an index into class_names
  skin_type: np.ndarray     # int32 [n] Fitzpatrick type id 0..5: the group
  captions: list            # str [n], the caption of each image
  caption_template: np.ndarray  # int32 [n] index into TEMPLATES of each caption
  class_prompts: list       # [C][len(TEMPLATES)] str, every template per class
  neutral_queries: list     # str, queries naming no class and no skin type
  class_names: tuple        # the renderer's classes
  group_names: tuple        # Fitzpatrick types I..VI
  info: dict                # how it was made; says SYNTHETIC

  def __len__(self) -> int:
    return len(self.labels)


def class_prompts() -> list:
  """[C][T] prompts: every template filled with every class's phrase."""
  return [[t.format(CLASS_PHRASES[c]) for t in TEMPLATES] for c in synth.CLASS_NAMES]


def generate(seed: int, n: int, image_size: int = 32,
             nuisance: bool = True) -> SyntheticVLM:
  """Renders n SYNTHETIC lesion images with captions; deterministic in the seed.

  Args:
    seed: int seed (images from `[seed, 10]`, captions from `[seed, 11]`).
    n: number of images.
    image_size: height and width in pixels.
    nuisance: hair, lighting, blur and sensor noise, as in the renderer.

  Returns:
    A `SyntheticVLM`.
  """
  if n < 1:
    raise ValueError(f"n must be positive, got {n}.")
  drawn = synth.generate(n, [int(seed), _IMAGE_STREAM], image_size, nuisance)
  labels = np.asarray(drawn["label"], np.int32)
  rng = np.random.default_rng([int(seed), _CAPTION_STREAM])
  template = rng.integers(0, len(TEMPLATES), n).astype(np.int32)
  prompts = class_prompts()
  return SyntheticVLM(
      images=drawn["image"],
      labels=labels,
      skin_type=np.asarray(drawn["group"], np.int32),
      captions=[prompts[c][t] for c, t in zip(labels, template)],
      caption_template=template,
      class_prompts=prompts,
      neutral_queries=list(NEUTRAL_QUERIES),
      class_names=tuple(synth.CLASS_NAMES),
      group_names=tuple(synth.GROUP_NAMES),
      info=dict(kind="SYNTHETIC (rendered, not real patient data)", seed=int(seed),
                n=int(n), image_size=int(image_size), nuisance=bool(nuisance)))
