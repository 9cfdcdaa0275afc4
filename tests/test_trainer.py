"""The real trainer on a tiny config: resume, non-finite stop, refusals, budget."""

import os

import jax
import numpy as np
import pytest

from baq.train import experiment, trainer
from baq.train.checkpoint import restore_params
from baq.data import pipeline
from baq.train.modes import get_mode
from baq.quant import units as U
from configs import tiny


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def data(data_dir):
  return experiment.load_data(_config(data_dir))


def _config(data_dir, **overrides):
  c = tiny.get_config()
  c.dataset.data_dir = data_dir
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _leaves(params):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_interrupted_run_resumes_exactly(tmp_path, data_dir, data, monkeypatch):
  config = _config(data_dir, checkpoint_every=3)
  full = trainer.train(config, str(tmp_path / "a"), mode="baq", data=data, steps=8, lr=1e-3)

  original = pipeline.Batcher.batch

  def interrupt(self, step):
    if step == 5:
      raise KeyboardInterrupt
    return original(self, step)

  monkeypatch.setattr(pipeline.Batcher, "batch", interrupt)
  with pytest.raises(KeyboardInterrupt):
    trainer.train(config, str(tmp_path / "b"), mode="baq", data=data, steps=8, lr=1e-3)
  monkeypatch.setattr(pipeline.Batcher, "batch", original)
  resumed = trainer.train(config, str(tmp_path / "b"), mode="baq", data=data, steps=8, lr=1e-3)
  for x, y in zip(_leaves(full.params), _leaves(resumed.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  lines = open(tmp_path / "b" / "metrics.jsonl").read().splitlines()
  assert any('"step": 8' in l for l in lines)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, data,
                                                              monkeypatch):
  config = _config(data_dir)
  original = pipeline.Batcher.batch

  def poisoned(self, step):
    b = original(self, step)
    if step >= 5:
      b["image"] = b["image"] * np.nan
    return b

  monkeypatch.setattr(pipeline.Batcher, "batch", poisoned)
  with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 4\\)"):
    trainer.train(config, str(tmp_path), mode="float", data=data, steps=12, lr=1e-3)
  params = restore_params(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in _leaves(params))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_incompatible_checkpoint_is_refused(tmp_path, data_dir, data):
  trainer.train(_config(data_dir), str(tmp_path), mode="float", data=data, steps=4, lr=1e-3)
  other = _config(data_dir)
  other.model.kwargs.widths = (4, 16)
  with pytest.raises(ValueError, match="incompatible run"):
    trainer.train(other, str(tmp_path), mode="float", data=data, steps=4, lr=1e-3)


@pytest.mark.parametrize("override,match", [
    ({"mode": "bq"}, "Unknown mode 'bq'. Valid mode names: baq, fair_static, fair_static_qat, float, qat"),
    ({"model.name": "resnet"}, "Valid model names: deit_tiny, resnet18, resnet50, small_cnn, tinyvit_5m"),
    ({"dataset.name": "isic"}, "Valid dataset names: .*synthetic_derm"),
    ({"quant.target_bits": 1.5}, "below min_bits=2"),
    ({"quant.target_bits": 9.0}, "above max_bits=8"),
    ({"baselines": "uniform8,int4"}, "Unknown baseline 'int4'"),
])
def test_bad_config_is_refused_before_training(tmp_path, data_dir, override, match):
  config = _config(data_dir, **override)
  with pytest.raises((KeyError, ValueError), match=match):
    experiment.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "fp32")


def test_unknown_penalty_is_refused(tmp_path, data_dir):
  config = _config(data_dir)
  config.penalties.worst = dict(weight=1.0)
  with pytest.raises(KeyError, match="Valid regularizer names: bitrate, cvar"):
    experiment.run(config, str(tmp_path))


def test_baq_ends_at_a_frozen_integer_allocation_within_budget(tmp_path, data_dir, data,
                                                              capsys):
  config = _config(data_dir, **{"quant.target_bits": 3.5})
  assert trainer.finalize_step(config, get_mode(config, "baq"), 8) == 6
  run = trainer.train(config, str(tmp_path), mode="baq", data=data, steps=8, lr=1e-3)
  assert "step     6 bit-widths projected to integers" in capsys.readouterr().out
  layers = U.find_units(run.params)
  bits, numel = np.asarray(U.gather_bits(run.params, layers)), U.unit_numels(layers)
  np.testing.assert_array_equal(bits, np.round(bits))
  assert np.sum(bits * numel) / np.sum(numel) <= 3.5 + 1e-9
  assert bits.min() >= 2 and bits.max() <= 8
  # The searched continuous bits are kept beside the checkpoints for export.
  searched = trainer.searched_params(str(tmp_path), run.params, layers)
  cont = np.asarray(U.gather_bits(searched, layers))
  assert not np.array_equal(cont, np.round(cont))
  assert abs(np.sum(cont * numel) / np.sum(numel) - 3.5) < 0.5
  # Uniform QAT never trains bits, so it never projects.
  assert trainer.finalize_step(config, get_mode(config, "qat", 4), 8) == float("inf")
