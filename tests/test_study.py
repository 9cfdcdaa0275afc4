"""The bias study end to end on the tiny config: outputs, numbers, resuming, the CLI.

The sweep over seeds and budgets (baq.experiment.sweep) is tested in test_sweep.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from baq.ptq import sequential as gptq_model
from baq.study.bias import cells as study_cells, pairs, plots, resume, runner
from baq.stats import corrections
from baq.experiment import job as experiment
from baq import workdir as wd
from configs import bias_study, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  # configs/bias_study.py:tiny: float 8 and 4 fine-tuning steps, one save and
  # one evaluation per run, rtn/gptq/fair_gptq(alpha 1)/qat at 4 bits, 2 seeds.
  c = bias_study.get_config("tiny")
  c.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return c


@pytest.fixture(scope="module")
def done(config, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("study"))
  return root, runner.run_study(config, root)


def _cell(root, name):
  z = np.load(os.path.join(root, name, "predictions.npz"))
  return z["logits"].argmax(-1) == z["labels"], z["groups"]


def test_study_config_sets_every_option_and_runlocal_shrinks_it():
  full, small = bias_study.get_config(), bias_study.get_config("runlocal")
  assert set(full.study) == set(runner.OPTIONS) == set(small.study)
  assert set(bias_study.get_config("tiny").study) == set(runner.OPTIONS)
  assert len(runner.grid(full)) == 3 * (2 * (3 + 3) + 1)  # rtn gptq fair x3 qat; baq@4
  assert [c.name for c in runner.grid(small)][:2] == ["rtn_w4_s0", "rtn_w4_s1"]
  assert len(runner.grid(small)) == 2 * 5 and small.float_steps < full.float_steps


def test_a_root_refuses_another_experiment_but_not_other_study_options(config, tmp_path):
  with open(tmp_path / wd.CONFIG_FILE, "w") as f:
    f.write(config.to_json())
  other = config.copy_and_resolve_references()
  other.seeds, other.eval_batch_size, other.dataset.data_dir = (0, 1, 2), 7, "/x"
  runner._check_root(other, str(tmp_path))
  other.model.kwargs.hidden = 9
  with pytest.raises(ValueError, match=r"differs in \['model.kwargs.hidden'\]"):
    runner._check_root(other, str(tmp_path))


def test_manual_dirs_compare_as_real_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "data").mkdir()
  a = {"dataset": {"name": "isic2019", "kwargs": {"manual_dir": "data"}}, "seed": 0}
  b = {"dataset": {"name": "isic2019", "kwargs": {"manual_dir": str(tmp_path / "data")}}}
  assert resume.conflicts(resume.cell_config(a), resume.cell_config(b)) == []
  b["dataset"]["kwargs"]["manual_dir"] = str(tmp_path)
  assert resume.conflicts(resume.cell_config(a), resume.cell_config(b)) == [
      "dataset.kwargs.manual_dir"]


def test_grid_names_and_bad_options(config):
  names = [c.name for c in runner.grid(config)]
  assert names == ["rtn_w4_s0", "rtn_w4_s1", "gptq_w4_s0", "gptq_w4_s1",
                   "fair_gptq_a1_w4_s0", "fair_gptq_a1_w4_s1", "qat_w4_s0", "qat_w4_s1"]
  bad = config.copy_and_resolve_references()
  bad.study.quantizers = "rtn,awq"
  with pytest.raises(ValueError, match="Unknown quantizers"):
    runner.grid(bad)
  bad = config.copy_and_resolve_references()
  bad.study.alpha = 1.0
  with pytest.raises(ValueError, match=r"Unknown study options \['alpha'\]"):
    runner.grid(bad)
  bad = config.copy_and_resolve_references()
  bad.study.verdict_rule = "loose"
  with pytest.raises(ValueError, match="Valid: differential, strict"):
    runner.grid(bad)


def test_the_config_is_the_one_source_of_the_options(config):
  # No defaults behind the config: a config without the section, or with an
  # option missing, is refused and told which config to start from.
  with pytest.raises(ValueError, match="no `study` section.*configs/bias_study.py"):
    runner.settings(tiny.get_config())
  bad = config.copy_and_resolve_references()
  del bad.study["pair_pool"]
  with pytest.raises(ValueError, match=r"lacks \['pair_pool'\].*configs/bias_study.py"):
    runner.settings(bad)
  with pytest.raises(ValueError, match="Unknown switches"):
    bias_study.get_config("tiny,fast")
  # The study's options are the config's, untouched (e.g. alphas and baq_bits
  # of the full config, which the runner once overrode with its own defaults).
  full = bias_study.get_config()
  assert runner.settings(full).to_dict() == dict(full.study.to_dict(), seeds=full.seeds)
  # The seeds are config.seeds, one place for every driver: not a study option.
  bad = full.copy_and_resolve_references()
  bad.study.seeds = (0,)
  with pytest.raises(ValueError, match="config.seeds now"):
    runner.settings(bad)
  assert {c.setting for c in runner.grid(full) if c.quantizer == "baq"} == {"baq_b4"}


def test_study_json_has_every_field_and_consistent_numbers(done):
  root, out = done
  on_disk = json.load(open(os.path.join(root, "study.json")))
  assert set(on_disk) == {"dataset", "num_examples", "group_names", "group_count", "seeds",
                          "study", "cells", "settings", "float", "verdicts",
                          "verdict_counts", "definitions"}
  assert list(on_disk["settings"]) == ["rtn_w4", "gptq_w4", "fair_gptq_a1_w4", "qat_w4"]
  assert len(on_disk["cells"]) == 10  # 8 quantized + 2 float
  for p in ("accuracy_vs_bits.png", "pareto.png"):
    assert os.path.getsize(os.path.join(root, p)) > 5000
  cf = np.stack([_cell(root, f"fp32_s{s}")[0] for s in (0, 1)])
  groups = _cell(root, "fp32_s0")[1]
  assert wd.cell_name(wd.FLOAT, 0) == "fp32_s0"
  for name, st in on_disk["settings"].items():
    assert st["avg_bits"] == 4.0
    cq = np.stack([_cell(root, f"{name}_s{s}")[0] for s in (0, 1)])
    assert st["accuracy"]["value"] == pytest.approx(cq.mean())
    assert st["change"]["overall"] == pytest.approx(cq.mean() - cf.mean())
    for r in st["groups"]:
      m = groups == r["group"]
      assert r["change"] == pytest.approx(cq[:, m].mean() - cf[:, m].mean())
      assert r["relative"] == pytest.approx(r["change"] - st["change"]["overall"])
      assert r["change_per_seed"] == pytest.approx((cq[:, m].mean(1) - cf[:, m].mean(1)).tolist())
      assert r["low"] <= r["accuracy"] <= r["high"]
      assert r["change_low"] <= r["change"] + 1e-12 and r["change"] <= r["change_high"] + 1e-12
      for k in ("change", "relative"):
        assert 0 <= r[f"{k}_p"] <= r[f"{k}_p_adj"] <= 1
      assert r["verdict"] in corrections.VERDICTS
      assert [x["seed"] for x in r["mcnemar"]] == [0, 1]
      b = int(np.sum(cf[0, m].astype(bool) & ~cq[0, m].astype(bool)))
      assert r["mcnemar"][0]["b"] == b
      assert "across_seeds_relative" in r and r["across_seeds_relative"]["num_seeds"] == 2
    assert set(st["skew"]["@20"]) == {"max_skew", "min_skew", "skew"}
  fair = on_disk["cells"]["fair_gptq_a1_w4_s0"]
  assert fair["pairs"] == "counterfactual" and fair["num_pairs"] == 40
  assert fair["granularity"] == "channel" and on_disk["cells"]["qat_w4_s0"]["steps"] == 4
  # GPTQ's calibration error is below round-to-nearest's on its own inputs.
  gptq = on_disk["cells"]["gptq_w4_s0"]
  assert gptq["calib_err"] < gptq["calib_err_rtn"]
  assert sum(on_disk["verdict_counts"].values()) == 4 * len(on_disk["group_names"])


def test_resume_skips_finished_cells_and_redoes_an_interrupted_one(config, done, monkeypatch):
  root, first = done
  quantize = gptq_model.quantize_model

  def boom(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")
  monkeypatch.setattr(study_cells, "train", boom)
  monkeypatch.setattr(gptq_model, "quantize_model", boom)
  again = runner.run_study(config, root)
  assert json.dumps(again["settings"]) == json.dumps(first["settings"])  # NaNs too
  # A crash between predictions.npz and metrics.json: that cell alone is redone.
  before = np.load(os.path.join(root, "gptq_w4_s1", "predictions.npz"))["logits"]
  os.remove(os.path.join(root, "gptq_w4_s1", "metrics.json"))
  calls = []
  monkeypatch.setattr(gptq_model, "quantize_model",
                      lambda *args, **kwargs: calls.append(1) or quantize(*args, **kwargs))
  third = runner.run_study(config, root)
  assert len(calls) == 1
  after = np.load(os.path.join(root, "gptq_w4_s1", "predictions.npz"))["logits"]
  np.testing.assert_allclose(after, before, atol=1e-5)
  assert third["settings"]["gptq_w4"]["accuracy"] == first["settings"]["gptq_w4"]["accuracy"]


def test_matched_pairs_on_penultimate_features(config, done, monkeypatch):
  root, _ = done
  monkeypatch.setattr(study_cells, "train", lambda *a, **k: pytest.fail("float run retrained"))
  s = runner.settings(config)
  s.pairs, s.num_pairs = "penultimate", 10
  data = experiment.load_data(config)
  fp = study_cells.FloatRun(config, s, data, root)
  assert fp.run_dir == os.path.join(root, "fp32_s0", "run")
  params, model = fp.variables(), fp.model  # the finished run: restored, not retrained
  feats = pairs.penultimate_features(model, params, np.zeros((3, 16, 16, 3), np.float32))
  assert feats.shape == (3, config.model.kwargs.hidden)  # the head's input
  (xa, xb), how = pairs.fair_pairs(config, s, data, model, params, seed=0)
  assert how["pairs"] == "penultimate" and how["pair_reference"] == 1  # type II is largest
  assert xa.shape == xb.shape and len(xa) == how["num_pairs"] > 0
  assert how["num_pairs"] <= 2 * len(how["pair_groups"])


def test_the_command_line_resumes_a_finished_study(config, done):
  # `python -m baq.study.bias` on the finished root: every cell is skipped, the
  # analysis is redone and the same study.json comes out.
  root, _ = done
  before = json.load(open(os.path.join(root, wd.STUDY_FILE)))
  out = subprocess.run(
      [sys.executable, "-m", "baq.study.bias", "--config=configs/bias_study.py:tiny",
       f"--config.dataset.data_dir={config.dataset.data_dir}", f"--workdir={root}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count("finished, skipped") == 10
  assert f"study: {os.path.join(root, wd.STUDY_FILE)}" in out.stdout
  assert "bias study:" in out.stdout
  again = json.load(open(os.path.join(root, wd.STUDY_FILE)))
  assert json.dumps(again) == json.dumps(before)


def test_the_command_line_refuses_a_config_without_a_study(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "baq.study.bias", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode != 0
  assert "no `study` section" in out.stderr and "configs/bias_study.py" in out.stderr
  assert not os.listdir(tmp_path)  # refused before anything was written


def test_a_baq_cell_is_deployed_at_its_budget(config, done, tmp_path, monkeypatch):
  # BAQ is not in the tiny grid: one cell, fine-tuned from the finished float run.
  root, _ = done
  s = runner.settings(config)
  data = experiment.load_data(config)
  fp = study_cells.FloatRun(config, s, data, str(tmp_path))
  fp.run_dir = os.path.join(root, "fp32_s0", "run")  # reuse the study's float run
  cell = study_cells.Cell("baq_b3_s0", "baq_b3", "baq", 3.0, 0)
  logits, info = study_cells.COMPUTE["baq"](cell, fp)
  assert logits.shape == (len(data["test"]), data["test"].num_classes)
  assert info["avg_bits"] == pytest.approx(3.0, abs=0.05)  # integers meeting the 3-bit budget
  assert info["run_dir"] == str(tmp_path / "baq_b3_s0" / "run")
  assert wd.finished(info["run_dir"], config.steps)
  # Finished: a second call restores the run instead of training it.
  monkeypatch.setattr(study_cells, "train", lambda *a, **k: pytest.fail("retrained"))
  again, _ = study_cells.COMPUTE["baq"](cell, fp)
  np.testing.assert_array_equal(again, logits)


def test_pareto_front_by_hand():
  points = np.array([[1, 5], [2, 4], [2, 3], [0, 6], [2, 4], [1, 1]])
  # (2, 3) and (1, 1) are dominated by (2, 4); the equal (2, 4)s both stay.
  assert plots.pareto_front(points).tolist() == [0, 1, 3, 4]
  assert plots.pareto_front(np.zeros((0, 2))).tolist() == []
