"""Shared pieces of the papers' settings (configs/isic2019.py, configs/fitzpatrick17k.py).

Not a config itself: `paper_config` turns the default config into one on a
real dataset with one of the papers' models, sized for the image size.
"""

import dataclasses

import ml_collections

from baq import models
from baq.data import augment
from configs import default


def paper_config(dataset: str, dataset_kwargs: dict, model: str, image_size: int,
                 positive_class: int, switches: frozenset = frozenset()
                 ) -> ml_collections.ConfigDict:
  """The default config on `dataset` with `model` (BAQ at 4.0 average bits).

  Args:
    dataset: a registered dataset name.
    dataset_kwargs: its options; `manual_dir` is left for the command line.
    model: a registered model (`baq.models.MODELS`); its options for
      `image_size` come from the registry (`baq.models.size_options`).
    image_size: side of the (square) images.
    positive_class: the class counted as positive by DP/EOpp/EOdds.
    switches: "runlocal" shrinks steps for a smoke run; "cpu" sizes the run
      for a 2-core CPU (the small CNN with a stride-2 stem and the default
      config's 1200 float and 400 fine-tuning steps); "augment" trains with
      `baq.data.augment.PAPER_RECIPE` (random-resized crop, both flips,
      colour jitter) and evaluates on the central 87.5 %.

  Returns:
    The config.
  """
  if model not in models.MODELS:
    raise KeyError(f"Unknown model {model!r}. Valid: {', '.join(models.MODELS.names())}.")
  runlocal = "runlocal" in switches
  # The papers' budget and baselines (FairQuant: 4-8 bits), abs-max scales and
  # BAQ's own schedule, whatever the main job's defaults are (docs/results.md's
  # ISIC and Fitzpatrick figures were measured so); override any of them.
  c = default.get_config("absmax4,runlocal" if runlocal else "absmax4")
  c.dataset.name = dataset
  c.dataset.kwargs = ml_collections.ConfigDict(dict(
      manual_dir=ml_collections.FieldReference(None, field_type=str),
      image_size=image_size, **dataset_kwargs))
  c.dataset.positive_class = positive_class
  c.dataset.sampling = "uniform"
  c.model.name = model
  c.model.kwargs = ml_collections.ConfigDict(models.size_options(model, image_size))
  c.batch_size = 64
  c.eval_batch_size = 256
  c.float_steps, c.steps = (60, 40) if runlocal else (3000, 1000)
  c.eval_every = c.checkpoint_every = 20 if runlocal else 500
  c.log_every = 20 if runlocal else 100
  if "cpu" in switches:
    if model == "small_cnn":
      c.model.kwargs.update(widths=(16, 32, 64), hidden=64, stem_stride=2)
    c.float_steps, c.steps = 1200, 400
    c.eval_every = c.checkpoint_every = 200
  if "augment" in switches:
    recipe = dataclasses.asdict(augment.PAPER_RECIPE)
    c.dataset.augment = ml_collections.ConfigDict(recipe)
    c.dataset.flip = False  # the recipe flips
    c.dataset.eval_center_crop = 0.875
  # Every unit its own bits per output channel, as the papers' CNN/ViT runs.
  c.quant.granularity = "channel"
  return c


SWITCHES = ("runlocal", "cpu", "augment")


def parse(arg, default_model: str, default_group: str, extra_switches: tuple = ()
          ) -> tuple[str, str, frozenset]:
  """"model,group[,switch...]" -> (model, group, switches).

  Args:
    arg: the config argument; switches may sit anywhere.
    default_model: model when none is given.
    default_group: grouping when none is given.
    extra_switches: switches the calling config knows besides SWITCHES.

  Returns:
    (model, group, the switches given).
  """
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  known = SWITCHES + tuple(extra_switches)
  switches = frozenset(p for p in parts if p in known)
  parts = [p for p in parts if p not in known]
  if len(parts) > 2:
    raise ValueError(f"Config argument {arg!r}: expected model,group plus switches from "
                     f"{', '.join(known)}; got {parts[2:]}.")
  model = parts[0] if parts else default_model
  group = parts[1] if len(parts) > 1 else default_group
  return model, group, switches
