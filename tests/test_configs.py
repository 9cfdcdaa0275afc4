"""The papers' configs: arguments, switches and the CPU-sized variant."""

import os

import jax
import jax.numpy as jnp
import pytest

from baq.study.bias import resume
from baq.models.cnn import SmallCNN
from configs import bias_study, fitzpatrick17k, isic2019, papers


def test_isic_switches_set_label_positive_class_and_cpu_size():
  full = isic2019.get_config("resnet18,sex")
  assert full.dataset.kwargs.label == "malignant" and full.dataset.positive_class == 1
  cpu = isic2019.get_config("small_cnn,age,diagnosis,cpu")
  assert cpu.dataset.kwargs.group_by == "age" and cpu.dataset.kwargs.label == "diagnosis"
  assert cpu.dataset.positive_class == 0  # MEL, the first diagnosis class
  assert cpu.model.kwargs.stem_stride == 2 and cpu.float_steps < full.float_steps
  # Switches may come in any order.
  assert isic2019.get_config("cpu,small_cnn,age,diagnosis").to_json() == cpu.to_json()


def test_bad_arguments_name_the_valid_choices():
  with pytest.raises(ValueError, match="Valid: sex, age"):
    isic2019.get_config("resnet18,skin")
  with pytest.raises(ValueError, match="Valid: six, binary"):
    fitzpatrick17k.get_config("resnet18,sex")
  with pytest.raises(KeyError, match="Valid: .*resnet18"):
    isic2019.get_config("resnet19,sex")
  with pytest.raises(ValueError, match="switches from runlocal, cpu"):
    papers.parse("resnet18,sex,fast", "resnet18", "sex")


def test_stem_stride_keeps_parameters_and_quarters_the_feature_map():
  x = jnp.zeros((2, 64, 64, 3))
  shapes = {}
  for stride in (1, 2):
    model = SmallCNN(num_classes=7, stem_stride=stride)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes[stride] = jax.tree.map(lambda a: a.shape, params)
    feats = jax.eval_shape(
        lambda p, m=model: m.apply(p, x, capture_intermediates=True)[1], params)
    conv0 = feats["intermediates"]["Conv_0"]["__call__"][0]
    assert conv0.shape == (2, 64 // stride, 64 // stride, 16)
  assert shapes[1] == shapes[2]


def test_isic_bias_study_can_reuse_the_cpu_pipeline_runs():
  # docs/bias_study.md: the pipeline runs with ../shared/..., the study with an absolute ISIC_DIR.
  pipeline = isic2019.get_config("small_cnn,age,diagnosis,cpu")
  pipeline.dataset.kwargs.manual_dir = os.path.relpath(bias_study.ISIC_DIR)
  mine = resume.cell_config(bias_study.get_config("isic"))
  theirs = resume.cell_config(pipeline)
  assert resume.conflicts({k: theirs[k] for k in ("model", "dataset")}, mine) == []
  assert bias_study.get_config("isic").study.pairs == "penultimate"
