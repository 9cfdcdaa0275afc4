r"""Bias study: does quantization amplify or reduce each group's accuracy loss?

The default experiment (configs/default.py: SmallCNN on the embedded
SYNTHETIC dermatology data) under a grid of quantizers x bit budgets x seeds
(baq.study): round-to-nearest, GPTQ and Fair-GPTQ (per-channel, post-
training) and uniform QAT at 8 and 4 bits, BAQ at 4 average bits, each
against the float model of its seed on the same test examples, with
bootstrap intervals, paired tests, Holm correction and a verdict per
(setting, group):

  python -m baq.study.bias --config=configs/bias_study.py --workdir=/tmp/baq_study

A smoke run (small data, few steps, 2 seeds, 4 bits):

  python -m baq.study.bias --config=configs/bias_study.py:runlocal --workdir=/tmp/baq_study_rl

The ISIC 2019 files (ISIC_DIR, the shared 64x64 HAM subset, or
`--config.dataset.kwargs.manual_dir=...`): the CPU-sized ISIC config
(`configs/isic2019.py:small_cnn,age,diagnosis,cpu`: groups by age band,
diagnosis with melanoma the positive class) with Fair-GPTQ pairs matched on
the float model's penultimate features, reusing the 3-seed runs of its
docstring command (docs/results.md, "ISIC 2019"):

  python -m baq.study.bias --config=configs/bias_study.py:isic --workdir=/tmp/baq_study_isic \
    '--config.study.reuse=/tmp/baq_ham_age/seed{seed}'

Reusing the float, uniform QAT and BAQ runs of the seed sweep
(`python -m baq.experiment.sweep --workdir=/tmp/baq_claims`):
`--config.study.reuse=/tmp/baq_claims/seed{seed}`. Any field can be
overridden, e.g. `--config.study.alphas="(0.25,1.0,4.0)" --config.steps=200`.

This file is the one source of the study's options and their defaults: the
runner (baq.study.bias.runner) reads `config.study` and nothing else, and refuses
a config without this section.
"""

import os

import ml_collections

from configs import default, isic2019, tiny

# The official files' layout (baq/data/manual/isic2019.py): the shared HAM subset beside
# the project.
ISIC_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "isic2019_ham_subset"))
SWITCHES = ("runlocal", "isic", "tiny")


def study_options() -> ml_collections.ConfigDict:
  """The `study` section at its defaults.

  Returns:
    A ConfigDict of every option the runner reads (baq.study.bias.runner.OPTIONS).
  """
  s = ml_collections.ConfigDict()
  # Comma-separated, from baq.study.bias.runner.QUANTIZERS; the runtimes' numerics
  # (llm_int8, nf4, fp4, dynamic_int8) are one setting each.
  s.quantizers = "rtn,gptq,fair_gptq,qat,baq"
  s.bits = (8, 4)  # bit-widths of rtn, gptq, fair_gptq, qat
  s.baq_bits = (4.0,)  # BAQ's average-bit budgets; () = `bits`
  s.alphas = (0.5, 2.0, 8.0)  # Fair-GPTQ weights of the pair term
  s.calib_size = 512  # GPTQ calibration examples from the train split
  s.calib_batch = 128  # examples per calibration forward pass
  # auto | counterfactual | penultimate | pixels; auto: counterfactual renders
  # on the synthetic data, penultimate-feature matching elsewhere.
  s.pairs = "auto"
  s.num_pairs = 512  # Fair-GPTQ pairs in all, split over the non-reference groups
  s.pair_reference = -1  # reference group of the pairs; -1: the largest training group
  s.pair_pool = 4096  # training examples searched by match_pairs (penultimate/pixels)
  s.fair_layers = ".*"  # regex of the layers that get the pair term
  s.gptq_kwargs = ml_collections.ConfigDict()  # gptq.gptq options, e.g. act_order=True
  s.reuse = ""  # e.g. "/tmp/baq_claims/seed{seed}": finished train.py runs to reuse
  s.num_bootstrap = 2000  # bootstrap replicates of every interval and test
  s.level = 0.95  # confidence level of the intervals
  s.significance = 0.05  # after correction
  s.correction = "holm"  # holm | bh | none, over all (setting, group) tests
  s.verdict_rule = "differential"  # differential | strict (baq.stats.corrections.verdicts)
  s.skew_k = (100,)  # MaxSkew/MinSkew@k of the positive-class ranking
  s.skew_smoothing = 0.5  # additive smoothing of top-k counts
  return s


def get_config(arg=None):
  """The default config plus a `study` section.

  Args:
    arg: comma-separated switches: "runlocal" shrinks the data, steps and
      grid; "isic" studies ISIC 2019 from ISIC_DIR instead of the synthetic
      data; "tiny" is configs/tiny.py with a grid of seconds (the tests).

  Returns:
    The config.

  Raises:
    ValueError: an unknown switch.
  """
  args = set(filter(None, (arg or "").split(",")))
  if args - set(SWITCHES):
    raise ValueError(f"Unknown switches {sorted(args - set(SWITCHES))}. "
                     f"Valid: {', '.join(SWITCHES)}.")
  if "isic" in args:
    c = isic2019.get_config("small_cnn,age,diagnosis," +
                            ("runlocal" if "runlocal" in args else "cpu"))
    c.dataset.kwargs.manual_dir = ISIC_DIR
  elif "tiny" in args:
    c = tiny.get_config()
  else:
    # The study's BAQ cells start at the budget and train `steps` steps (they
    # compute no allocation plan), with abs-max scales, as its tables were
    # measured: the earlier defaults.
    c = default.get_config("absmax4,runlocal" if "runlocal" in args else "absmax4")
  s = c.study = study_options()
  if "isic" in args:
    s.alphas, s.pairs = (2.0, 8.0), "penultimate"
  if "runlocal" in args:
    s.bits, s.baq_bits, s.alphas = (4,), (4.0,), (2.0,)
    c.seeds = (0, 1)
    s.calib_size = s.num_pairs = 128
    s.num_bootstrap = 500
    s.skew_k = (50,)
  if "tiny" in args:
    c.float_steps, c.steps = 8, 4
    c.log_every = c.eval_every = c.checkpoint_every = 100  # one save, one evaluation
    s.quantizers, s.bits, s.alphas = "rtn,gptq,fair_gptq,qat", (4,), (1.0,)
    c.seeds = (0, 1)
    s.calib_size = s.calib_batch = 64
    s.num_pairs, s.num_bootstrap, s.skew_k = 40, 300, (20,)
  return c
