"""Every study refuses an impossible number before any work, naming its bound.

The bias, language-model and CLIP studies' checks (what their command lines
run first) on their configs with one field set out of bounds; the configs
as shipped pass.
"""

import pytest

from baq.study.bias import runner
from baq.study.lm import study as lm_study
from baq.study.vlm import study as vlm_study
from configs import bias_study, lm, vlm


def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  return config


@pytest.mark.parametrize("field,value,message", [
    ("study.alphas", (-1.0,), r"study.alphas=\(-1.0,\) must be a tuple of finite numbers >= 0"),
    ("study.calib_size", 0, r"study.calib_size=0 must be an integer >= 1"),
    ("study.num_bootstrap", 0, r"study.num_bootstrap=0 must be an integer >= 1"),
    ("study.level", 1.5, r"study.level=1.5 must be in \(0, 1\)"),
    ("study.skew_k", (0,), r"study.skew_k=\(0,\) must be a tuple"),
    ("seeds", (0, 0), r"repeats a seed"),
])
def test_the_bias_study_refuses(field, value, message):
  with pytest.raises(ValueError, match=message):
    runner.settings(_set(bias_study.get_config("tiny"), field, value))


@pytest.mark.parametrize("field,value,message", [
    ("train.steps", -3, r"train.steps=-3 must be an integer >= 1"),
    ("train.batch_size", 0, r"train.batch_size=0 must be an integer >= 1"),
    ("quant.calib_sequences", 0, r"quant.calib_sequences=0 must be an integer >= 1"),
    ("bootstrap", 0, r"bootstrap=0 must be an integer >= 1"),
    ("quant.bits", "9", r"'rtn@9': rtn's bits must be an integer in \[2, 8\]"),
    ("quant.alphas", "-1", r"alpha -1.0 must be finite and >= 0"),
    ("quant.budgets", "1.0", r"quant.budgets holds 1.0, outside the allowed bits \[2, 8\]"),
    ("seeds", (-1,), r"integers >= 0"),
])
def test_the_lm_study_refuses(field, value, message):
  with pytest.raises(ValueError, match=message):
    lm_study.check(_set(lm.get_config("tiny"), field, value))


@pytest.mark.parametrize("field,value,message", [
    ("train.steps", 0, r"train.steps=0 must be an integer >= 1"),
    ("bootstrap", 0, r"bootstrap=0 must be an integer >= 1"),
    ("retrieval_k", "20,0", r"retrieval_k='20,0' must list integers >= 1"),
    ("seeds", (), r"non-empty"),
])
def test_the_clip_study_refuses(field, value, message):
  with pytest.raises(ValueError, match=message):
    vlm_study.check(_set(vlm.get_config(), field, value))


def test_the_shipped_configs_pass():
  for arg in (None, "runlocal", "isic", "tiny"):
    runner.settings(bias_study.get_config(arg))
  for arg in (None, "tiny", "hf"):
    lm_study.check(lm.get_config(arg))
  for arg in (None, "fairface", "facet"):
    vlm_study.check(vlm.get_config(arg))
