"""The Pareto benchmark on the tiny config: every run, both variants, the table and the plot."""

import json
import os

import pytest

from baq import progress
from baq.experiment import pareto, sweep
from baq import workdir as wd


def test_without_fairness_penalties_keeps_only_the_bit_constraints(tiny_config):
  c = pareto.without_fairness_penalties(tiny_config)
  assert c.penalties.cvar.weight == 0.0
  assert c.penalties.bitrate.weight == tiny_config.penalties.bitrate.weight > 0
  assert tiny_config.penalties.cvar.weight > 0  # the original is untouched


def test_the_equal_steps_control_trains_the_static_allocation_for_baqs_total(tiny_config):
  assert pareto.equal_steps_control(tiny_config) is None  # no separate search: same steps
  c = tiny_config.copy_and_resolve_references()
  c.quant.search_steps = 5
  control = pareto.equal_steps_control(c)
  assert control.mode == "fair_static_qat" and control.baselines == ""
  assert control.steps == c.steps + 5 and c.steps == tiny_config.steps


@pytest.fixture(scope="module")
def finished(make_tiny_config, tmp_path_factory):
  """One seed of the tiny Pareto benchmark, trained once for this file."""
  config = make_tiny_config(**{"quant.search_steps": 3})  # BAQ searches: the control runs
  root = str(tmp_path_factory.mktemp("pareto"))
  total = pareto.runs_per_seed(config, [3.0])
  lines = []
  p = progress.Progress("pareto", total, unit="run", printer=lines.append, primary=True)
  runs = {0: pareto.run_seed(config, root, 0, budgets=[3.0], uniform=[2, 4], p=p)}
  # One progress line per experiment.run: the total counted beforehand is right.
  assert total == 5 and len(lines) == total and "run 5 of 5 (seed 0, 3 bits, " in lines[-1]
  return config, root, runs


def test_one_seed_runs_every_method_at_every_budget(finished, tmp_path):
  tiny_config, root, runs = finished
  names = list(runs[0])
  assert names == [wd.FLOAT, "uniform2", "uniform4", "fair_static@4", "fair_static_qat@3",
                   "baq@3", "fair_static_qat-equal@3", "fair_static_qat@3-nopen", "baq@3-nopen",
                   "fair_static_qat-equal@3-nopen"]
  control = os.path.join(f"{wd.variant_dir(root, 0, 3.0, 'nopenalty')}_{pareto.EQUAL}",
                         wd.CONFIG_FILE)
  with open(control) as f:
    saved = json.load(f)
  assert saved["steps"] == tiny_config.steps + 3 and saved["penalties"]["cvar"]["weight"] == 0
  for name in names[3:]:
    assert runs[0][name]["avg_bits"] <= float(name.split("@")[1].split("-")[0]) + 1e-9
  assert runs[0]["uniform2"]["avg_bits"] == 2.0
  # The variant without penalties trained with the CVaR weight 0 and the bitrate kept.
  for variant, cvar in (("penalty", tiny_config.penalties.cvar.weight), ("nopenalty", 0.0)):
    with open(os.path.join(wd.variant_dir(root, 0, 3.0, variant), wd.CONFIG_FILE)) as f:
      saved = json.load(f)
    assert saved["penalties"]["cvar"]["weight"] == pytest.approx(cvar)
    assert saved["quant"]["target_bits"] == 3.0 and saved["init_checkpoint"]
  table = sweep.format_summary(runs, [0])
  assert all(n in table for n in names)
  pareto.plot(str(tmp_path / wd.PARETO_PLOT), runs, [0])
  assert os.path.getsize(tmp_path / wd.PARETO_PLOT) > 10_000


def test_the_command_line_reports_a_finished_root(finished, tiny_data_dir):
  """`python -m baq.experiment.pareto` over the finished root: it resumes every
  run (nothing left to train), prints the tables and draws the plot."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import ROOT  # pylint: disable=import-outside-toplevel
  _, root, _ = finished
  out = subprocess.run(
      [sys.executable, "-m", "baq.experiment.pareto", f"--workdir={root}",
       "--budgets=3", "--uniform=2,4", "--config=configs/tiny.py", "--config.seeds=(0,)",
       "--config.quant.search_steps=3", f"--config.dataset.data_dir={tiny_data_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "baq@3-nopen" in out.stdout and "seed 0: uniform2=" in out.stdout
  assert " loss=" not in out.stdout  # every run resumed finished: no step was trained
  assert os.path.getsize(os.path.join(root, wd.PARETO_PLOT)) > 10_000
