"""The entry points as users start them: one process, and two processes on localhost.

Each command runs as real processes through the coordinator environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), exactly as a
multi-host job starts, one CPU device per process. Its report must equal
that of one process driving two CPU devices (the same global mesh, so the
same programs): `train.py`, then `eval.py` over the two-process workdir;
the language-model study is in test_entry_points_lm.py (a file of its own,
so that the two test workers share the work). Only process 0 prints the table; every
process reaches every collective (a process that waits on a missing one
hangs until the timeout, which fails the test).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, session_dir

TIMEOUT = 300


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict:
  """The test's environment for a command: CPU, no inherited job, and one
  persistent compilation cache for every command of this file (a program
  compiled by one run is loaded by the next; a loaded program is the
  compiled one, so results do not change)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  cache = os.path.join(session_dir(), "jax_entry_points")
  return dict(env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def one_process(args, devices=2):
  """`python ARGS` as one process over `devices` CPU devices."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(XLA_FLAGS=flags.strip()),
                       capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def processes(args, n=2):
  """`python ARGS` as `n` processes of one jax.distributed job; their stdouts."""
  port = _port()
  procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                     JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i)))
           for i in range(n)]
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      outs.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      p.kill()
  for i, (rc, _, stderr) in enumerate(outs):
    assert rc == 0, f"process {i}:\n{stderr[-3000:]}"
  return [o[1] for o in outs]


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
  """train.py on the tiny config: one process (2 devices) and two processes."""
  root = tmp_path_factory.mktemp("entry")
  args = ["train.py", "--config=configs/tiny.py", f"--config.dataset.data_dir={tiny_data_dir}"]
  one = str(root / "one")
  out_one = one_process(args + [f"--workdir={one}"])
  two = str(root / "two")
  outs = processes(args + [f"--workdir={two}"])
  return one, two, out_one, outs


def test_train_as_two_processes_reports_what_one_process_does(trained):
  one, two, out_one, outs = trained
  assert _report(two) == _report(one)
  # Process 0 prints the table and writes the shared files; process 1 neither.
  assert "report: " in outs[0] and "worst" in outs[0]
  assert "report: " not in outs[1] and "worst" not in outs[1]
  assert "report: " in out_one
  with open(os.path.join(two, "fp32", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps))  # one writer: every logged step once


def test_eval_as_two_processes_reproduces_the_report(trained, tmp_path):
  _, two, _, _ = trained
  before = _report(two)
  os.remove(os.path.join(two, "report.json"))
  outs = processes(["eval.py", f"--workdir={two}"])
  assert _report(two) == before
  assert "report: " in outs[0] and "report: " not in outs[1]
