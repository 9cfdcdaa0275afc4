"""baq.experiment.lanes: independent runs side by side, with the results of runs in order."""

import json
import os
import threading

import jax
import numpy as np
import pytest

from baq.experiment import job as experiment, lanes
from baq.train.checkpoint import restore_variables


def test_each_lane_runs_in_order_and_lanes_run_at_once():
  barrier = threading.Barrier(2, timeout=30)  # passes only if both lanes are running
  log, lock = [], threading.Lock()

  def step(lane, i, wait=False):
    def thunk():
      if wait:
        barrier.wait()
      with lock:
        log.append((lane, i, threading.get_ident()))
    return thunk

  lanes.run_lanes([[step("a", 0, True), step("a", 1)], [step("b", 0, True), step("b", 1)]], 2)
  for lane in "ab":
    mine = [(i, t) for l, i, t in log if l == lane]
    assert [i for i, _ in mine] == [0, 1] and len({t for _, t in mine}) == 1
  assert {t for *_, t in log} != {threading.get_ident()}


def test_one_lane_at_a_time_runs_in_order_in_this_thread():
  log = []
  lanes.run_lanes([[lambda: log.append((1, threading.get_ident()))],
                   [lambda: log.append((2, threading.get_ident()))]], 1)
  assert log == [(1, threading.get_ident()), (2, threading.get_ident())]


def test_a_lanes_error_is_raised_after_the_others_stop():
  done = []

  def boom():
    raise FloatingPointError("non-finite loss")

  with pytest.raises(FloatingPointError, match="non-finite"):
    lanes.run_lanes([[boom, lambda: done.append("a1")], [lambda: done.append("b0")]], 2)
  assert "a1" not in done and done in ([], ["b0"])  # the failed lane stopped; no lane starts after
  with pytest.raises(ValueError, match="concurrent=0 must be >= 1"):
    lanes.run_lanes([[boom]], 0)


def test_concurrent_runs_give_the_results_of_runs_in_order(tmp_path, make_tiny_config,
                                                           tiny_float_run):
  """The main job with its baselines and BAQ in two lanes: every run's final
  weights and the whole report equal those of the same job run in order."""
  out = {}
  for n in (1, 2):
    workdir = str(tmp_path / f"lanes{n}")
    config = make_tiny_config(init_checkpoint=tiny_float_run, concurrent_runs=str(n))
    out[n] = (workdir, experiment.run(config, workdir))
  (w1, r1), (w2, r2) = out[1], out[2]
  assert json.dumps(r1["methods"], sort_keys=True) == json.dumps(r2["methods"], sort_keys=True)
  runs = [d for d in sorted(os.listdir(w1)) if os.path.isdir(os.path.join(w1, d, "checkpoints"))]
  assert {"uniform8", "uniform4", "baq"} <= set(runs)
  for d in runs:
    a, b = (restore_variables(os.path.join(w, d)) for w in (w1, w2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y, err_msg=d)


def test_concurrent_runs_must_be_auto_or_a_positive_integer(make_tiny_config, tmp_path):
  for bad in ("0", "two", "-1"):
    with pytest.raises(ValueError, match=f"concurrent_runs='{bad}' must be 'auto' or an integer"):
      experiment.run(make_tiny_config(concurrent_runs=bad), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_auto_lanes_follow_the_backend(monkeypatch):
  """auto: 2 on a one-device CPU process, 1 on an accelerator or with
  several local devices; more than one lane over several devices is refused."""
  assert lanes.concurrency("auto") == 2 and lanes.concurrency("3") == 3
  assert lanes.concurrency(1) == 1
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert lanes.concurrency("auto") == 1 and lanes.concurrency("2") == 2
  monkeypatch.setattr(jax, "local_device_count", lambda: 8)
  assert lanes.concurrency("auto") == 1 and lanes.concurrency("1") == 1
  with pytest.raises(ValueError, match="drives 8 local devices"):
    lanes.concurrency("2")
  monkeypatch.setattr(jax, "local_device_count", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert lanes.concurrency("2") == 1  # several processes: lanes in order
