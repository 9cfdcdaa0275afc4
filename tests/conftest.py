"""Shared test set-up: paths, cheap compilation, and the tiny run's fixtures.

* The repository root goes on sys.path (for `configs`).
* XLA's cheap-compile options (`CHEAP`), set before any backend starts, on
  a CPU-only machine (they are XLA:CPU's):
  compiling dominates these CPU tests, and they cut the tiny trainer's
  compile time about fourfold (a float run 9.6 s -> 2.6 s, a BAQ run
  17.6 s -> 4.7 s here). Every test compares numbers computed under the
  same options, or against numpy within a tolerance. A user's own
  XLA_FLAGS are kept in front of them.
* A persistent compilation cache per test worker, so a program compiled
  once (the trainer's step, the evaluation) is loaded, not compiled, by the
  next run of the same shapes in that worker (a BAQ run 17.6 s -> 1.1 s the
  second time). One directory per worker: jax writes its entries without a
  lock. (Not one shared cache with `jax_compilation_cache_max_size`, which
  takes a lock: its every write then lists and stats the whole directory to
  evict, so the suite's thousands of programs slowed it several fold.) A
  loaded program is the compiled one, so results do not change.
* Fixtures of the tiny config (configs/tiny.py): `tiny_data_dir` (its
  dataset), `tiny_config` (a fresh config reading it), `make_tiny_config`
  (the same, with dotted overrides, for module fixtures), `tiny_data` (the
  loaded splits) and `tiny_float_run`, ONE float model trained with the
  tiny config for the whole session: fine-tune from it by setting
  `config.init_checkpoint = tiny_float_run`, and never write into it.

What the session shares is built once across pytest-xdist workers, under a
file lock in one session directory that all workers share (made by the
controller, removed at the end of the session).
"""

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

CHEAP = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
         "--xla_cpu_use_fusion_emitters=false")


def _cpu_only() -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS says cpu, or no
  accelerator plugin (CUDA, ROCm, TPU) is installed. XLA reads its flags
  when the backend starts, before JAX can be asked which one it is."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
             "libtpu")
  return not any(importlib.util.find_spec(p) for p in plugins)


if _cpu_only() and CHEAP not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP}".strip()


_SESSION_ENV = "BAQ_TEST_SESSION_DIR"
_OWNED = []  # the session directory, in the process that made it


def pytest_configure(config):
  """The session directory and this worker's persistent compilation cache.

  Only under pytest: a test module run as a subprocess script imports this
  file without either. The controller (or a run without xdist) makes the
  session directory; xdist workers inherit its path through the environment.
  """
  # pytest-xdist >= 3.6 otherwise sends the files with the most tests first,
  # which puts the few long ones of LONGEST_FIRST (two-process runs) last.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  import jax  # pylint: disable=import-outside-toplevel
  if _SESSION_ENV not in os.environ:
    os.environ[_SESSION_ENV] = tempfile.mkdtemp(prefix="baq_tests_")
    _OWNED.append(os.environ[_SESSION_ENV])
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  jax.config.update("jax_compilation_cache_dir", os.path.join(session_dir(), f"jax_{worker}"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The files that take longest on 2 CPU cores (setup and calls, 2026-12-07), longest
# first. `--dist loadfile` hands files to the two workers in collection order, so
# starting with these packs the rest around them instead of leaving one worker
# to finish a long file alone at the end.
LONGEST_FIRST = ("test_entry_points.py", "test_entry_points_lm.py", "test_sharding.py",
                 "test_pareto.py", "test_protocol.py", "test_lm_study.py", "test_vlm_study.py",
                 "test_experiment.py", "test_export_onnx.py", "test_vlm_real.py",
                 "test_accelerator_bench.py")


def pytest_collection_modifyitems(session, config, items):
  """Runs the files of LONGEST_FIRST first, in that order; the others as collected."""
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_unconfigure(config):
  del config
  for path in _OWNED:
    shutil.rmtree(path, ignore_errors=True)
    os.environ.pop(_SESSION_ENV, None)


def session_dir() -> str:
  """The directory this test session's workers share (removed at its end)."""
  return os.environ[_SESSION_ENV]


@contextlib.contextmanager
def _lock(path: str):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build_once(name: str, build) -> str:
  """`build(path)` once per session across workers; returns the path.

  A `.done` marker, written after `build` returns, tells later callers
  (in any worker) that the path is complete; a half-built one (a worker
  that died mid-build) is removed and built again.
  """
  root = session_dir()
  path, done = os.path.join(root, name), os.path.join(root, f"{name}.done")
  with _lock(os.path.join(root, f"{name}.lock")):
    if not os.path.exists(done):
      shutil.rmtree(path, ignore_errors=True)
      build(path)
      open(done, "w").close()
  return path


def tiny_config_with(data_dir: str, **overrides):
  """configs/tiny.py reading `data_dir`, with dotted-key overrides
  ({"quant.target_bits": 3.5})."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.dataset.data_dir = data_dir
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="session")
def tiny_data_dir() -> str:
  """The tiny config's dataset, generated once per session."""
  from baq.experiment import job as experiment  # pylint: disable=import-outside-toplevel
  return build_once("tfds", lambda d: experiment.load_data(tiny_config_with(d)))


@pytest.fixture(scope="session")
def make_tiny_config(tiny_data_dir):
  """`make(**dotted_overrides)`: a fresh tiny config reading the shared data."""
  return lambda **overrides: tiny_config_with(tiny_data_dir, **overrides)


@pytest.fixture
def tiny_config(make_tiny_config):
  """A fresh tiny config (reads the session's dataset)."""
  return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_data(make_tiny_config) -> dict:
  """The tiny config's train, validation and test splits."""
  from baq.experiment import job as experiment  # pylint: disable=import-outside-toplevel
  return experiment.load_data(make_tiny_config())


@pytest.fixture(scope="session")
def tiny_float_run(make_tiny_config) -> str:
  """Workdir of the tiny config's float model, trained once per session exactly
  as `experiment.run` trains WORKDIR/fp32. Read-only: copy it to write."""
  from baq.experiment import job as experiment
  from baq.train import loop as trainer
  from baq import workdir  # pylint: disable=import-outside-toplevel

  def build(path):
    c = make_tiny_config()
    trainer.train(c, path, mode="float", data=experiment.load_data(c), steps=c.float_steps,
                  lr=c.optim.lr, use_penalties=False, name=workdir.FLOAT)

  return build_once("fp32", build)
