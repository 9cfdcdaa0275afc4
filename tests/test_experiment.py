"""The main job end to end on the tiny config, and eval.py's reproduction."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from baq.train import experiment
from configs import tiny
from conftest import ROOT


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  config.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config, workdir, experiment.run(config, workdir)


def test_report_has_every_method_and_metric(run):
  _, workdir, report = run
  on_disk = json.load(open(os.path.join(workdir, "report.json")))
  assert on_disk["methods"].keys() == report["methods"].keys()
  assert {"fp32", "uniform8", "uniform4", "uniform8_ptq", "uniform4_ptq", "baq"} <= set(report["methods"])
  for name, m in report["methods"].items():
    for key in ("accuracy", "worst_group_accuracy", "accuracy_gap", "demographic_parity_gap",
                "equal_opportunity_gap", "equalized_odds_gap", "avg_bits", "size_bytes"):
      assert np.isfinite(m[key]), (name, key)
    assert m["worst_group_accuracy"] <= m["accuracy"] + 1e-9
  assert report["methods"]["uniform4"]["avg_bits"] == 4.0
  assert report["methods"]["fp32"]["size_bytes"] > report["methods"]["uniform8"]["size_bytes"]


def test_exported_allocation_meets_budget_and_reproduces_logits(run):
  config, workdir, report = run
  alloc = json.load(open(os.path.join(workdir, "bit_allocation.json")))
  numel = np.array([u["numel"] for u in alloc["units"]])
  bits = np.array([u["bits"] for u in alloc["units"]])
  assert np.all(bits == np.round(bits)) and bits.min() >= 2 and bits.max() <= 8
  avg = (numel * bits).sum() / numel.sum()
  assert avg <= config.quant.target_bits + 1e-9 and alloc["avg_bits"] == pytest.approx(avg)
  assert report["methods"]["baq"]["avg_bits"] == pytest.approx(avg, abs=1e-5)
  assert report["methods"]["baq"]["export_max_abs_logit_diff"] < 1e-4
  assert os.path.getsize(os.path.join(workdir, "bit_allocation.png")) > 1000
  assert os.path.exists(os.path.join(workdir, "packed_weights.npz"))


def test_eval_py_reproduces_the_report(run):
  _, workdir, report = run
  out = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={workdir}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "uniform4_ptq" in out.stdout
  again = json.load(open(os.path.join(workdir, "report.json")))
  for name, m in report["methods"].items():
    assert again["methods"][name]["accuracy"] == pytest.approx(m["accuracy"])
    assert again["methods"][name]["worst_group_accuracy"] == pytest.approx(m["worst_group_accuracy"])


def test_only_the_primary_process_writes_the_report(run, tmp_path, monkeypatch):
  config, workdir, report = run
  copy = str(tmp_path / "host1")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "report.json", "bit_allocation.*", "packed_weights.npz"))
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
  again = experiment.report(config, copy)
  assert not {"report.json", "bit_allocation.json", "packed_weights.npz"} & set(os.listdir(copy))
  for name, m in report["methods"].items():  # every host still evaluates
    assert again["methods"][name]["worst_group_accuracy"] == pytest.approx(
        m["worst_group_accuracy"])
