r"""Bias study: does quantization amplify or reduce each group's accuracy loss?

The default experiment (configs/default.py: SmallCNN on the embedded
SYNTHETIC dermatology data) under a grid of quantizers x bit budgets x seeds
(baq/study.py): round-to-nearest, GPTQ and Fair-GPTQ (per-channel, post-
training) and uniform QAT at 8 and 4 bits, BAQ at 4 average bits, each
against the float model of its seed on the same test examples, with
bootstrap intervals, paired tests, Holm correction and a verdict per
(setting, group):

  python benchmarks/bias_study.py --config=configs/bias_study.py --root=/tmp/baq_study

A smoke run (small data, few steps, 2 seeds, 4 bits):

  python benchmarks/bias_study.py --config=configs/bias_study.py:runlocal --root=/tmp/baq_study_rl

The ISIC 2019 files (`isic2019`, e.g. the shared HAM subset; groups by age
band, 7 diagnoses, melanoma as the positive class; Fair-GPTQ pairs matched on
the float model's penultimate features), post-training quantizers only:

  python benchmarks/bias_study.py --config=configs/bias_study.py:isic --root=/tmp/baq_study_isic

Reusing the float, uniform QAT and BAQ runs of benchmarks/fairness_claims.py:
`--config.study.reuse=/tmp/baq_claims/seed{seed}`. Any field can be
overridden, e.g. `--config.study.alphas="(0.25,1.0,4.0)" --config.steps=200`.
"""

import ml_collections

from configs import default


ISIC_DIR = "/work/shared/data/isic2019_ham_subset"  # the official files (baq/data/isic2019.py)


def get_config(arg=None):
  """The default config plus a `study` section.

  Args:
    arg: comma-separated switches: "runlocal" shrinks the data, steps and
      grid; "isic" studies ISIC 2019 from ISIC_DIR instead of the synthetic
      data.

  Returns:
    The config.
  """
  args = set((arg or "").split(","))
  c = default.get_config("runlocal" if "runlocal" in args else None)
  s = c.study = ml_collections.ConfigDict()
  s.quantizers = "rtn,gptq,fair_gptq,qat,baq"  # from baq.study.QUANTIZERS
  s.bits = (8, 4)  # bit-widths of rtn, gptq, fair_gptq, qat
  s.baq_bits = (4.0,)  # BAQ's average-bit budgets
  s.seeds = (0, 1, 2)  # training seeds; each has its own float model
  s.alphas = (0.5, 2.0, 8.0)  # Fair-GPTQ weights of the pair term
  s.calib_size = 512  # GPTQ calibration examples from the train split
  s.calib_batch = 128
  s.pairs = "auto"  # counterfactual renders here; penultimate/pixels matching elsewhere
  s.num_pairs = 512  # Fair-GPTQ pairs, split over the non-reference groups
  s.pair_reference = -1  # -1: the largest training group
  s.pair_pool = 4096  # examples searched by match_pairs (penultimate/pixels)
  s.fair_layers = ".*"  # layers that get the pair term
  s.gptq_kwargs = ml_collections.ConfigDict()  # e.g. act_order=True
  s.reuse = ""  # e.g. "/tmp/baq_claims/seed{seed}": finished train.py runs to reuse
  s.num_bootstrap = 2000
  s.level = 0.95  # confidence level of the intervals
  s.significance = 0.05  # after correction
  s.correction = "holm"  # holm | bh | none
  s.verdict_rule = "differential"  # differential | strict (baq.stats.verdicts)
  s.skew_k = (100,)  # MaxSkew/MinSkew@k of the malignant-probability ranking
  s.skew_smoothing = 0.5
  if "isic" in args:
    c.dataset.name = "isic2019"
    c.dataset.kwargs = ml_collections.ConfigDict(dict(
        manual_dir=ISIC_DIR, image_size=32, group_by="age", label="diagnosis"))
    c.dataset.positive_class = 0  # MEL
    c.float_steps = 60 if "runlocal" in args else 600
    s.quantizers, s.bits, s.alphas = "rtn,gptq,fair_gptq", (4, 3), (2.0, 8.0)
    s.pairs = "penultimate"
  if "runlocal" in args:
    s.bits, s.baq_bits, s.seeds, s.alphas = (4,), (4.0,), (0, 1), (2.0,)
    s.calib_size = s.num_pairs = 128
    s.num_bootstrap = 500
    s.skew_k = (50,)
  return c
