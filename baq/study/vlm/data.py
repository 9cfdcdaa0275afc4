"""The CLIP study's data side: a registry of data kinds, one common structure, the splits.

Data kinds (`DATA_KINDS`, `config.data.kind`; an unknown name lists the valid ones):
  synthetic     `baq.data.vlm.synthetic`: SYNTHETIC lesion images with captions
                (the only kind the in-run CLIP can be trained on); zero-shot
                lesion class and retrieval skew for its neutral queries, over
                skin_type
  fairface      FairFace's `data.split` (val) under `data.root`: retrieval skew
                of `data.queries` over each attribute (gender, race, age);
                FairFace has no classes to classify zero-shot
  facet         FACET under `data.root`: zero-shot person class of each person
                crop ("a photo of a {class1}") with per-group accuracy over
                gender, skin_tone and age; FACET's "na" groups are left out
                of every metric
  image_folder  baq's labelled image folder under `data.root` (labels.csv with
                image, label, group columns; images/; `baq.data.manual.folder`):
                zero-shot label ("a photo of a {label}") per group
Every kind gives a `VLMData`; `data.attributes` picks attributes (empty: all
of the kind's), `data.max_images` reads a seeded sample of the images.

`prepare` brings a seed's data and float model together: the in-run CLIP
(word tokenizer, images at `data.image_size`, trained on the captions) or a
pretrained checkpoint (its own tokenizer, images at its image_size), with
the rows each part uses (`split`) and mixed4's calibration set
(`calibration`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np

from baq.data.manual import folder
from baq.data.text import tokenizer as tok
from baq.data.vlm import facet, fairface, read_images, synthetic
from baq.models.clip.model import CLIP
from baq.registry import Registry
from baq.study.vlm import quant as vlm_quant

DATA_KINDS: Registry[Callable] = Registry("CLIP study data kind")
EXCLUDED = -1  # the group id of an image an attribute's metrics leave out ("na")


@dataclasses.dataclass
class VLMData:
  """One data kind's images, tasks and groups (parallel arrays over n images)."""
  title: str                  # how tables and figures name the data ("SYNTHETIC", ...)
  images: np.ndarray          # uint8 [n, size, size, 3], resized for the model
  attributes: dict            # name -> (int32 [n] group ids, EXCLUDED = left out; names)
  labels: Optional[np.ndarray] = None   # int32 [n] class ids (zero-shot tasks)
  class_prompts: Optional[list] = None  # [C][T] prompts per class (zero-shot tasks)
  queries: list = dataclasses.field(default_factory=list)  # neutral queries (retrieval)
  captions: Optional[list] = None       # [n], to train the in-run CLIP (synthetic only)

  def __len__(self) -> int:
    return len(self.images)


def _rows(n: int, d) -> np.ndarray:
  """The images to read: all, or a seeded sample of `data.max_images` (file order)."""
  if d.max_images and n > d.max_images:
    return np.sort(np.random.default_rng(d.seed).choice(n, d.max_images, replace=False))
  return np.arange(n)


def _attributes(kind: str, available: dict, names: dict, rows, wanted: str,
                drop: str = "") -> dict:
  """The chosen attributes' (group ids, names) at `rows`; a group named `drop` is EXCLUDED."""
  chosen = [a.strip() for a in str(wanted).split(",") if a.strip()] or list(available)
  out = {}
  for a in chosen:
    if a not in available:
      raise ValueError(f"data.kind {kind!r} has no attribute {a!r}. Valid: "
                       f"{', '.join(available)}.")
    ids, group_names = np.asarray(available[a], np.int32)[rows], list(names[a])
    if drop in group_names:  # FACET's "na" is the last code, so the others keep theirs
      ids = np.where(ids == group_names.index(drop), EXCLUDED, ids).astype(np.int32)
      group_names.remove(drop)
    out[a] = (ids, group_names)
  return out


def _root(d, kind: str) -> str:
  if not d.root:
    raise ValueError(f"data.kind {kind!r} reads its files from data.root; set it.")
  return d.root


def _prompts(class_names, templates) -> list:
  """[C][T] prompts: each template with each class name (underscores as spaces)."""
  return [[t.format(str(c).replace("_", " ")) for t in templates] for c in class_names]


@DATA_KINDS.register("synthetic")
def _synthetic(d, size: int) -> VLMData:
  data = synthetic.generate(d.seed, d.num_images, image_size=size)
  return VLMData("SYNTHETIC", data.images,
                 _attributes("synthetic", {"skin_type": data.skin_type},
                             {"skin_type": data.group_names}, slice(None), d.attributes),
                 labels=data.labels, class_prompts=data.class_prompts,
                 queries=list(data.neutral_queries), captions=list(data.captions))


@DATA_KINDS.register("fairface")
def _fairface(d, size: int) -> VLMData:
  ff = fairface.load_fairface(_root(d, "fairface"), d.split, missing_images=d.missing_images)
  rows = _rows(len(ff.paths), d)
  return VLMData(f"FairFace {d.split}", read_images([ff.paths[i] for i in rows], size),
                 _attributes("fairface", ff.attributes, ff.names, rows, d.attributes),
                 queries=list(d.queries))


@DATA_KINDS.register("facet")
def _facet(d, size: int) -> VLMData:
  fc = facet.load_facet(_root(d, "facet"), missing_images=d.missing_images)
  rows = _rows(len(fc.paths), d)
  images = read_images([fc.paths[i] for i in rows], size, boxes=fc.boxes[rows])
  return VLMData("FACET", images,
                 _attributes("facet", fc.attributes, fc.names, rows, d.attributes, drop="na"),
                 labels=fc.labels[rows], class_prompts=_prompts(fc.class_names, d.prompts))


@DATA_KINDS.register("image_folder")
def _image_folder(d, size: int) -> VLMData:
  t = folder.table(_root(d, "image_folder"), missing_images=d.missing_images)
  rows = _rows(len(t.paths), d)
  names = {"group": t.metadata["group_names"]}
  return VLMData(f"image folder {d.root}", read_images([t.paths[i] for i in rows], size),
                 _attributes("image_folder", {"group": t.fields["group"]}, names, rows,
                             d.attributes),
                 labels=np.asarray(t.fields["label"], np.int32)[rows],
                 class_prompts=_prompts(t.metadata["class_names"], d.prompts))


def check_groups(attributes: dict, kind: str, rows=slice(None)) -> None:
  """Refuses an attribute with fewer than two groups among `rows` (naming it)."""
  for a, (ids, names) in attributes.items():
    present = sorted(set(np.asarray(ids)[rows].tolist()) - {EXCLUDED})
    if len(present) < 2:
      raise ValueError(
          f"data.kind {kind!r}: attribute {a!r} has {len(present)} group(s) "
          f"({', '.join(names[g] for g in present) or 'none'}) among the evaluated images; "
          "group metrics need at least two. Drop it from data.attributes or add images.")


def load(config, image_size: int) -> VLMData:
  """The configured data kind at `image_size` pixels, its attributes checked.

  Raises:
    KeyError: an unknown data.kind (the valid ones are listed).
    ValueError: an unknown attribute, an attribute with a single group (named),
      or a zero-shot kind without prompt templates.
    FileNotFoundError: missing dataset files (named by the loaders).
  """
  kind = config.data.kind
  data = DATA_KINDS.get(kind)(config.data, image_size)
  if data.labels is not None and not all(data.class_prompts):
    raise ValueError(f"data.kind {kind!r} classifies zero-shot: data.prompts needs a template.")
  if data.labels is None and not data.queries:
    raise ValueError(f"data.kind {kind!r} is a retrieval task: data.queries needs a query.")
  check_groups(data.attributes, kind)
  return data


def in_run_text(data: VLMData, max_len: int) -> tuple[object, Callable, int]:
  """The in-run CLIP's word tokenizer over the data's texts, and its encoder.

  Returns:
    (tokenizer, encode: list of str -> int32 [m, width] with <bos>/<eos> and
    <pad> = 0, one width for every text of the data, eos id).
  """
  texts = (list(data.captions) + [p for c in data.class_prompts for p in c]
           + list(data.queries))
  tk = tok.word_tokenizer(texts)
  ids = tok.special_ids(tk)
  enc = lambda s: tok.encode_batch(tk, list(s), bos_id=ids["bos"], eos_id=ids["eos"],
                                   pad_id=ids["pad"], max_len=max_len)[0]
  width = max(enc(texts).shape[1], 2)

  def encode(sentences):
    ids_ = enc(sentences)
    return np.pad(ids_, ((0, 0), (0, width - ids_.shape[1])))

  return tk, encode, ids["eos"]


def split(data: VLMData, config, seed: int, trained: bool) -> dict:
  """Row indices: `train` (the in-run CLIP's), `test` (evaluated), `calib` (mixed4's).

  In-run CLIP: a `data.test_fraction` test split drawn with data.seed, and
  `quant.calib_images` of the training rows drawn with the model seed, as
  before. Pretrained checkpoints: every image is evaluated but, for a
  zero-shot task, `quant.calib_images` held out (drawn with data.seed, so
  every seed evaluates the same images) for mixed4's group losses.
  """
  n, n_calib = len(data), int(config.quant.calib_images)
  order = np.random.default_rng(config.data.seed).permutation(n)
  if trained:
    n_test = int(round(config.data.test_fraction * n))
    train = order[n_test:]
    return dict(train=train, test=order[:n_test],
                calib=np.random.default_rng(seed).permutation(train)[:n_calib])
  if data.labels is None or n_calib == 0:
    return dict(train=order[:0], test=np.arange(n), calib=order[:0])
  if 2 * n_calib > n:
    raise ValueError(f"quant.calib_images={n_calib} would hold out more than half of the "
                     f"{n} images from evaluation; lower it.")
  return dict(train=order[:0], test=np.sort(order[n_calib:]), calib=np.sort(order[:n_calib]))


def prepare(config, seed_dir: str, seed: int) -> dict:
  """The float model and the prepared data of one seed.

  Returns:
    dict(model, params, stats (the image normalisation), data (a
    `VLMData`), prompts [C, T, width] or None, queries [q, width]
    or None, and the row indices train, test, calib).
  """
  kind = config.data.kind
  DATA_KINDS.get(kind)  # an unknown kind fails before any model work
  load_fn = vlm_quant.SOURCES.get(config.model.source)
  if load_fn is None:  # the in-run CLIP, trained on the data's captions (resumed)
    data = load(config, config.data.image_size)
    if data.captions is None:
      raise ValueError(f"data.kind {kind!r} has no captions to train the in-run CLIP on; set "
                       "model.source to hf or open_clip (a pretrained checkpoint).")
    tk, encode, eos = in_run_text(data, config.data.max_len)
    rows = split(data, config, seed, trained=True)
    model = CLIP(vlm_quant.clip_config(config, tk.get_vocab_size(), eos))
    params = vlm_quant.train_clip(model, data.images[rows["train"]],
                                  encode(data.captions)[rows["train"]], config, seed,
                                  os.path.join(seed_dir, "fp32"))
    stats = vlm_quant.IN_RUN_STATS
  else:
    model, params, tk = load_fn(config.model)
    data = load(config, model.config.vision.image_size)
    encode = lambda texts: vlm_quant.encode_texts(tk, texts, model.config.text)
    rows = split(data, config, seed, trained=False)
    stats = vlm_quant.CLIP_STATS
  check_groups(data.attributes, kind, rows["test"])
  prompts = None
  if data.labels is not None:
    c, t = len(data.class_prompts), len(data.class_prompts[0])
    prompts = encode([p for ps in data.class_prompts for p in ps]).reshape(c, t, -1)
  return dict(model=model, params=params, stats=stats, data=data, prompts=prompts,
              queries=encode(data.queries) if data.queries else None, **rows)


def calibration(prepared: dict, attribute: str) -> Optional[dict]:
  """mixed4's calibration set: `prepare`'s calib rows with one attribute's groups.

  Args:
    prepared: `prepare`'s output.
    attribute: the groups of the allocation's losses ("" = the data's first
      attribute); rows EXCLUDED from it are left out.

  Returns:
    dict(images, labels, groups, prompts, num_groups, stats), or None for a
    retrieval task (no labels).
  """
  data, rows = prepared["data"], prepared["calib"]
  if data.labels is None:
    return None
  attribute = attribute or next(iter(data.attributes))
  if attribute not in data.attributes:
    raise ValueError(f"quant.attribute {attribute!r} is not an attribute of the data. Valid: "
                     f"{', '.join(data.attributes)}.")
  ids, names = data.attributes[attribute]
  rows = rows[ids[rows] != EXCLUDED]
  return dict(images=data.images[rows], labels=data.labels[rows], groups=ids[rows],
              prompts=prepared["prompts"], num_groups=len(names), stats=prepared["stats"])
