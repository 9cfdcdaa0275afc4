"""benchmarks/accelerator.py in its --smoke mode, on 2 fake CPU devices.

The script is the one a GPU session runs (its docstring has the command);
here it runs shrunk in a process of its own, with two host devices so that
its 1-vs-all-devices branch runs too, and every figure it prints must be a
finite positive number, its ratios the quotients of its rates.
"""

import json
import math
import os
import subprocess
import sys

from conftest import CHEAP, ROOT


def _run(tmp_path):
  out = tmp_path / "accel.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {CHEAP}")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--smoke",
                         f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  written = [json.loads(l) for l in out.read_text().splitlines()]
  assert printed == written
  return {(r["kind"], r.get("model"), r.get("workers")): r for r in written}


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_smoke_run_prints_every_figure(tmp_path):
  records = _run(tmp_path)
  env = records[("env", None, None)]
  assert env["devices"] == 2 and env["platform"] == "cpu" and env["dtype"] == "bfloat16"
  assert (env["batch_size"], env["image_size"], env["steps"], env["repeats"]) == (8, 32, 2, 1)
  rates = {}
  for model in ("resnet18", "deit_tiny"):
    r = records[("step", model, None)]
    assert _positive(r["float_examples_per_s"]) and _positive(r["baq_examples_per_s"])
    assert math.isclose(r["baq_over_float"], r["baq_examples_per_s"] / r["float_examples_per_s"])
    rates.update({f"{model}/float": r["float_examples_per_s"],
                  f"{model}/baq": r["baq_examples_per_s"]})
  inp = records[("input", None, 0)]
  assert _positive(inp["images_per_s"]) and set(inp["input_over_step"]) == set(rates)
  for k, ratio in inp["input_over_step"].items():
    assert math.isclose(ratio, inp["images_per_s"] / rates[k])
  dev = records[("devices", "resnet18", None)]
  assert dev["devices"] == 2 and dev["per_device_batch"] == 8
  assert _positive(dev["one_device_examples_per_s"]) and _positive(dev["all_devices_examples_per_s"])
  assert math.isclose(dev["all_over_one"],
                      dev["all_devices_examples_per_s"] / dev["one_device_examples_per_s"])
