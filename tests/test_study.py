"""The bias study end to end on the tiny config: outputs, numbers, resuming."""

import json
import os

import numpy as np
import pytest

from baq.study import pairs, stats, runner as study, cells as study_cells
from baq.quant import gptq_model as GM
from configs import bias_study, tiny


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = tiny.get_config()
  c.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.float_steps, c.steps = 8, 4
  c.log_every = c.eval_every = c.checkpoint_every = 100  # one save, one evaluation
  c.study = dict(quantizers="rtn,gptq,fair_gptq,qat", bits=(4,), seeds=(0, 1), alphas=(1.0,),
                 calib_size=64, calib_batch=64, num_pairs=40, num_bootstrap=300, skew_k=(20,))
  return c


@pytest.fixture(scope="module")
def done(config, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("study"))
  return root, study.run_study(config, root)


def _cell(root, name):
  z = np.load(os.path.join(root, name, "predictions.npz"))
  return z["logits"].argmax(-1) == z["labels"], z["groups"]


def test_study_config_sets_every_option_and_runlocal_shrinks_it():
  full, small = bias_study.get_config(), bias_study.get_config("runlocal")
  assert set(full.study) == set(study.DEFAULTS) == set(small.study)
  assert len(study.grid(full)) == 3 * (2 * (3 + 3) + 1)  # rtn gptq fair x3 qat; baq@4
  assert [c.name for c in study.grid(small)][:2] == ["rtn_w4_s0", "rtn_w4_s1"]
  assert len(study.grid(small)) == 2 * 5 and small.float_steps < full.float_steps


def test_a_root_refuses_another_experiment_but_not_other_study_options(config, tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    f.write(config.to_json())
  other = config.copy_and_resolve_references()
  other.study.seeds, other.eval_batch_size, other.dataset.data_dir = (0, 1, 2), 7, "/x"
  study._check_root(other, str(tmp_path))
  other.model.kwargs.hidden = 9
  with pytest.raises(ValueError, match=r"differs in \['model.kwargs.hidden'\]"):
    study._check_root(other, str(tmp_path))


def test_manual_dirs_compare_as_real_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "data").mkdir()
  a = {"dataset": {"name": "isic2019", "kwargs": {"manual_dir": "data"}}, "seed": 0}
  b = {"dataset": {"name": "isic2019", "kwargs": {"manual_dir": str(tmp_path / "data")}}}
  assert study_cells.conflicts(study_cells.cell_config(a), study_cells.cell_config(b)) == []
  b["dataset"]["kwargs"]["manual_dir"] = str(tmp_path)
  assert study_cells.conflicts(study_cells.cell_config(a), study_cells.cell_config(b)) == [
      "dataset.kwargs.manual_dir"]


def test_grid_names_and_bad_options(config):
  names = [c.name for c in study.grid(config)]
  assert names == ["rtn_w4_s0", "rtn_w4_s1", "gptq_w4_s0", "gptq_w4_s1",
                   "fair_gptq_a1_w4_s0", "fair_gptq_a1_w4_s1", "qat_w4_s0", "qat_w4_s1"]
  bad = config.copy_and_resolve_references()
  bad.study.quantizers = "rtn,awq"
  with pytest.raises(ValueError, match="Unknown quantizers"):
    study.grid(bad)
  bad = config.copy_and_resolve_references()
  bad.study.alpha = 1.0
  with pytest.raises(ValueError, match=r"Unknown study options \['alpha'\]"):
    study.grid(bad)
  bad = config.copy_and_resolve_references()
  bad.study.verdict_rule = "loose"
  with pytest.raises(ValueError, match="Valid: differential, strict"):
    study.grid(bad)


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
      assert r["verdict"] in stats.VERDICTS
      assert [x["seed"] for x in r["mcnemar"]] == [0, 1]
      b = int(np.sum(cf[0, m].astype(bool) & ~cq[0, m].astype(bool)))
      assert r["mcnemar"][0]["b"] == b
      assert "across_seeds_relative" in r and r["across_seeds_relative"]["num_seeds"] == 2
    assert set(st["skew"]["@20"]) == {"max_skew", "min_skew", "skew"}
  fair = on_disk["cells"]["fair_gptq_a1_w4_s0"]
  assert fair["pairs"] == "counterfactual" and fair["num_pairs"] == 40
  assert fair["granularity"] == "channel" and on_disk["cells"]["qat_w4_s0"]["steps"] == 4
  # GPTQ's calibration error is below round-to-nearest's on its own inputs.
  assert on_disk["cells"]["gptq_w4_s0"]["calib_err"] < on_disk["cells"]["gptq_w4_s0"]["calib_err_rtn"]
  assert sum(on_disk["verdict_counts"].values()) == 4 * len(on_disk["group_names"])


def test_resume_skips_finished_cells_and_redoes_an_interrupted_one(config, done, monkeypatch):
  root, first = done
  quantize = GM.quantize_model

  def boom(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")
  monkeypatch.setattr(study_cells, "train", boom)
  monkeypatch.setattr(GM, "quantize_model", boom)
  again = study.run_study(config, root)
  assert json.dumps(again["settings"]) == json.dumps(first["settings"])  # NaNs too
  # A crash between predictions.npz and metrics.json: that cell alone is redone.
  before = np.load(os.path.join(root, "gptq_w4_s1", "predictions.npz"))["logits"]
  os.remove(os.path.join(root, "gptq_w4_s1", "metrics.json"))
  calls = []
  monkeypatch.setattr(GM, "quantize_model",
                      lambda *args, **kwargs: calls.append(1) or quantize(*args, **kwargs))
  third = study.run_study(config, root)
  assert len(calls) == 1
  after = np.load(os.path.join(root, "gptq_w4_s1", "predictions.npz"))["logits"]
  np.testing.assert_allclose(after, before, atol=1e-5)
  assert third["settings"]["gptq_w4"]["accuracy"] == first["settings"]["gptq_w4"]["accuracy"]


def test_matched_pairs_on_penultimate_features(config, done):
  root, _ = done
  s = study.settings(config)
  s.pairs, s.num_pairs = "penultimate", 10
  data = study.experiment.load_data(config)
  params = study_cells.run_variables(os.path.join(root, "fp32_s0", "run"))
  model = study_cells.model_for(config, data["test"])
  feats = pairs.penultimate_features(model, params, np.zeros((3, 16, 16, 3), np.float32))
  assert feats.shape == (3, config.model.kwargs.hidden)  # the head's input
  (xa, xb), how = pairs.fair_pairs(config, s, data, model, params, seed=0)
  assert how["pairs"] == "penultimate" and how["pair_reference"] == 1  # type II is largest
  assert xa.shape == xb.shape and len(xa) == how["num_pairs"] > 0
  assert how["num_pairs"] <= 2 * len(how["pair_groups"])
