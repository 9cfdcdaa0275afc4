"""How a process decides to start `jax.distributed` (multi-host start-up).

`baq.launch._cluster_in_env` and `initialize_distributed` are tested
in this process against a recording stand-in for `jax.distributed.initialize`
(no cluster is started): which environments (an explicit coordinator,
SLURM, Open MPI, TPU hosts, BAQ_DISTRIBUTED) start a job and with which
arguments, that a started job is left alone, and that a failed start says
what to do.
"""

import os

import pytest


class _FakeDistributed:
  """Records `jax.distributed.initialize` calls; `error` makes them raise."""

  def __init__(self):
    self.calls, self.started, self.error = [], False, None

  def initialize(self, **kwargs):
    self.calls.append(kwargs)
    if self.error is not None:
      raise self.error
    self.started = True

  def is_initialized(self):
    return self.started


@pytest.fixture
def fake_distributed(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  fake = _FakeDistributed()
  monkeypatch.setattr(jax.distributed, "initialize", fake.initialize)
  monkeypatch.setattr(jax.distributed, "is_initialized", fake.is_initialized)
  return fake


EXPLICIT = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3")
EXPLICIT_KW = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
SLURM4 = dict(SLURM_JOB_ID="77", SLURM_NTASKS="4")


@pytest.mark.parametrize("env,cluster,call", [
    ({}, False, None),
    # BAQ_DISTRIBUTED=0 wins over everything.
    (dict(BAQ_DISTRIBUTED="0", **EXPLICIT, **SLURM4), True, None),
    (dict(BAQ_DISTRIBUTED="0", OMPI_COMM_WORLD_SIZE="8"), True, None),
    # An explicit job: its three variables, as numbers, whatever else is set.
    (EXPLICIT, False, EXPLICIT_KW),
    (dict(EXPLICIT, **SLURM4), True, EXPLICIT_KW),
    (dict(EXPLICIT, BAQ_DISTRIBUTED="1"), False, EXPLICIT_KW),
    # Launchers jax detects by itself: initialize() without arguments.
    (SLURM4, True, {}),
    (dict(SLURM_JOB_ID="77", SLURM_NTASKS="1"), False, None),
    (dict(SLURM_JOB_ID="77"), False, None),
    (dict(SLURM_NTASKS="4"), False, None),  # not a SLURM job
    (dict(OMPI_COMM_WORLD_SIZE="2"), True, {}),
    (dict(OMPI_COMM_WORLD_SIZE="1"), False, None),
    (dict(TPU_PROCESS_ADDRESSES="10.0.0.1:8476,10.0.0.2:8476"), True, {}),
    (dict(TPU_PROCESS_ADDRESSES="10.0.0.1:8476"), False, None),
    (dict(TPU_WORKER_HOSTNAMES="t-0,t-1,t-2,t-3"), True, {}),
    (dict(TPU_WORKER_HOSTNAMES="t-0"), False, None),
    (dict(TPU_WORKER_HOSTNAMES="t-0, ,"), False, None),  # blank entries are no hosts
    # BAQ_DISTRIBUTED=1: jax's auto-detection whatever the environment.
    (dict(BAQ_DISTRIBUTED="1"), False, {}),
    (dict(BAQ_DISTRIBUTED="1", SLURM_JOB_ID="77", SLURM_NTASKS="1"), False, {}),
])
def test_distributed_start_follows_the_environment(fake_distributed, env, cluster, call):
  from baq import launch  # pylint: disable=import-outside-toplevel
  assert launch._cluster_in_env(env) is cluster  # pylint: disable=protected-access
  started = launch.initialize_distributed(env)
  assert started is (call is not None)
  assert fake_distributed.calls == ([] if call is None else [call])
  # Idempotent: a started job is not started again, and says it is one.
  assert launch.initialize_distributed(env) is started
  assert len(fake_distributed.calls) == (call is not None)


def test_distributed_start_reads_os_environ(fake_distributed, monkeypatch):
  from baq import launch  # pylint: disable=import-outside-toplevel
  for k in ("BAQ_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert launch.initialize_distributed() is False and fake_distributed.calls == []
  for k, v in EXPLICIT.items():
    monkeypatch.setenv(k, v)
  assert launch.initialize_distributed() is True
  assert fake_distributed.calls == [EXPLICIT_KW]


def test_an_initialized_process_is_left_alone(fake_distributed):
  from baq import launch  # pylint: disable=import-outside-toplevel
  fake_distributed.started = True  # e.g. the user's script started it
  assert launch.initialize_distributed(dict(BAQ_DISTRIBUTED="0")) is True
  assert launch.initialize_distributed(SLURM4) is True
  assert fake_distributed.calls == []


def test_a_failed_start_says_what_to_do(fake_distributed):
  import re  # pylint: disable=import-outside-toplevel
  from baq import launch  # pylint: disable=import-outside-toplevel
  cause = RuntimeError("jax.distributed.initialize() must be called before any JAX computations")
  fake_distributed.error = cause
  with pytest.raises(RuntimeError, match=re.escape(
      f"jax.distributed.initialize failed ({cause}). A multi-process run must start it before "
      "any JAX computation: call baq.launch.start() (or baq.launch.initialize_distributed()) "
      "first thing in your script.")) as info:
    launch.initialize_distributed(SLURM4)
  assert info.value.__cause__ is cause and fake_distributed.calls == [{}]


@pytest.mark.parametrize("seeds,message", [
    ((), "non-empty tuple of integers >= 0"),
    ((0, -1), "non-empty tuple of integers >= 0"),
    ((0, 1.5), "non-empty tuple of integers >= 0"),
    ((1, 2, 1), "repeats a seed"),
])
def test_bad_seeds_are_refused_naming_the_bound(seeds, message):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from baq import launch  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=message):
    launch.seeds(ml_collections.ConfigDict(dict(seeds=seeds)))
  assert launch.seeds(ml_collections.ConfigDict(dict(seeds=(3, 0, 7)))) == [3, 0, 7]
  with pytest.raises(ValueError, match="has none"):
    launch.seeds(ml_collections.ConfigDict())


def test_an_override_of_a_missing_field_is_refused_naming_the_fields(tmp_path):
  """`--config.penalties.bogus.weight=1` was a bare KeyError('bogus') from
  ml_collections; it is refused before any work, with the fields there are."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from absl import app  # pylint: disable=import-outside-toplevel
  from baq import launch  # pylint: disable=import-outside-toplevel
  from conftest import ROOT  # pylint: disable=import-outside-toplevel
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with pytest.raises(app.UsageError, match=r"config.penalties has no field 'bogus'; it has: "
                       r"bitrate, cvar"):
      launch.check_overrides(["x", "--config.penalties.bogus.weight=1"], "configs/default.py")
    with pytest.raises(app.UsageError, match=r"config.quant has no field 'nope'"):
      launch.check_overrides(["x", "--config=configs/tiny.py", "--config.quant.nope=1"], None)
    launch.check_overrides(["x", "--config.steps=3", "--config.quant.target_bits=3"],
                           "configs/default.py")  # fields that exist pass
  finally:
    os.chdir(cwd)
  out = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'w'}",
                        "--config.penalties.bogus.weight=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode != 0 and "config.penalties has no field 'bogus'" in out.stderr
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "w")
