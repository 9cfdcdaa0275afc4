"""The seed sweep's summaries and command line (baq.experiment.sweep).

Hand-made per-seed results of the tiny config (its baselines and one extra
BAQ budget) are named per budget by `seed_methods` and printed as mean +- std
over seeds, per seed against the baselines, and per group; `python -m
baq.experiment.sweep` documents its flags and refuses to run without --workdir.
"""

import os
import subprocess
import sys

from baq.experiment import sweep
from baq import workdir as wd
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(acc, worst, bits, eopp=0.1, groups=(0.5, 0.7)):
  return dict(accuracy=acc, worst_group_accuracy=worst, accuracy_gap=max(groups) - min(groups),
              avg_bits=bits, equal_opportunity_gap=eopp, equalized_odds_gap=2 * eopp,
              group_accuracy=list(groups))


def _sweep_runs():
  config = tiny.get_config()  # mode baq at 4.0 bits, baselines uniform8,uniform4
  runs = {}
  for seed, (a, w) in {0: (0.80, 0.60), 1: (0.90, 0.70)}.items():
    main = {"methods": {"fp32": _entry(a + 0.02, w + 0.02, 32.0),
                        "uniform8": _entry(a + 0.01, w + 0.01, 8.0),
                        "uniform4": _entry(a - 0.04, w - 0.10, 4.0),
                        "baq": _entry(a, w, 4.0 + seed / 10)},
            "group_names": ["I-II", "V-VI"]}
    extra = {5.0: {"methods": {"baq": _entry(a + 0.005, w + 0.01, 5.0)}}}
    runs[seed] = sweep.seed_methods(config, main, extra)
  return config, runs


def test_the_sweep_names_each_budget_and_summarises_mean_and_std():
  _, runs = _sweep_runs()
  assert list(runs[0]) == ["fp32", "uniform8", "uniform4", "baq@5", "baq@4"]
  assert runs[1]["baq@5"]["avg_bits"] == 5.0 and runs[1]["baq@4"]["avg_bits"] == 4.1
  lines = sweep.format_summary(runs, [0, 1]).splitlines()
  assert lines[0] == "Mean +- std over seeds [0, 1] (test split, percent; bits unscaled)"
  assert lines[1].split() == ["method", *sweep.KEYS]
  row = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
  assert list(row) == ["fp32", "uniform8", "uniform4", "baq@5", "baq@4"]
  # baq@4: accuracy 80/90 -> 85 +- 5, worst 60/70 -> 65 +- 5, gap 20 +- 0, bits 4.0/4.1.
  assert row["baq@4"] == ["85.00", "+-", "5.00", "65.00", "+-", "5.00", "20.00", "+-", "0.00",
                          "4.05", "+-", "0.05"]
  assert row["uniform4"][:3] == ["81.00", "+-", "5.00"]


def test_the_sweep_prints_each_seed_against_the_baselines_and_per_group():
  config, runs = _sweep_runs()
  baselines = [wd.uniform_name(b) for b in wd.baseline_bits(config)]
  lines = sweep.format_per_seed(runs, [0, 1], baselines).splitlines()
  assert lines[0].startswith("Per seed: worst-group accuracy (acc)")
  assert lines[1] == ("  seed 0: uniform8=61.00 (81.00) uniform4=50.00 (76.00) "
                      "baq@5=61.00 (80.50) baq@4=60.00 (80.00)")
  assert lines[2].startswith("  seed 1: uniform8=71.00 (91.00) ")
  # A missing baseline is left out, not an error.
  assert "uniform8" not in sweep.format_per_seed(runs, [0], ["uniform2", "uniform4"])
  table = sweep.format_per_group(runs, [0, 1], ["I-II", "V-VI"]).splitlines()
  assert table[1].split() == ["method", "EOpp", "EOdds", "I-II", "V-VI"]
  assert table[2].split() == ["fp32", "10.00", "+-", "0.00", "20.00", "+-", "0.00",
                              "50.00", "+-", "0.00", "70.00", "+-", "0.00"]


def test_the_sweep_command_line_has_the_documented_flags():
  out = subprocess.run([sys.executable, "-m", "baq.experiment.sweep", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
  assert "baq.experiment.sweep --workdir=" in out.stdout, out.stderr[-2000:]  # absl's --help exits 1
  for flag in ("--config", "--workdir", "--extra_bits", "--[no]per_group"):
    assert flag in out.stdout
  assert "--seeds" not in out.stdout and "(default: '5.0')" in out.stdout
  assert "(default: 'configs/default.py')" in out.stdout
  missing = subprocess.run([sys.executable, "-m", "baq.experiment.sweep"], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode != 0 and "--workdir" in missing.stderr
