"""The process setup every entry point starts with, in big_vision's order.

  from absl import app
  from baq import launch

  launch.define_flags("configs/default.py")

  def main(argv):
    config, workdir = launch.start(argv, check=checks.validate)
    job.run(config, workdir)

  if __name__ == "__main__":
    app.run(main)

`start` does, in this order, before anything else touches JAX:
  1. `jax.distributed` starts when the environment describes a
     multi-process job (`initialize_distributed`): it must come before the
     first JAX call that starts a backend (even `jax.process_index()`);
  2. logging: libraries log warnings only (and tfds shows no progress
     bars) unless --verbosity is given;
  3. the config check (`check(config)`): a bad value is refused, naming
     its bound, before any work.

Every entry point takes the same two flags, --config (an ml_collections
config file, any field overridable: --config.steps=10) and --workdir (where
everything the run writes goes); seeds live in the config (`config.seed`
for one run, `config.seeds` for the multi-seed drivers). Only process 0
writes shared files (`is_primary`); every process computes, so each issues
the same collectives in the same order.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import flags

FLAGS = flags.FLAGS


def _cluster_in_env(env: Mapping[str, str]) -> bool:
  """A multi-process launcher that `jax.distributed` detects by itself."""
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Starts `jax.distributed` when the environment asks for it (idempotent).

  Checked in order:
    * BAQ_DISTRIBUTED=0: never (a single-process run on a cluster node).
    * JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: an
      explicit job (any machines; JAX_LOCAL_DEVICE_IDS is honoured by jax).
    * a SLURM job with SLURM_NTASKS > 1, Open MPI with
      OMPI_COMM_WORLD_SIZE > 1, or a Cloud TPU pod slice
      (TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES with several hosts):
      jax detects the coordinator, process count and id itself.
    * BAQ_DISTRIBUTED=1: jax's auto-detection whatever the environment
      (e.g. Kubernetes JobSets).

  Must run before any JAX computation; `start` calls it first.

  Returns:
    True when the process is part of a multi-process job.
  """
  import jax  # pylint: disable=import-outside-toplevel
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return True
  flag = env.get("BAQ_DISTRIBUTED", "")
  if flag == "0":
    return False
  if "JAX_COORDINATOR_ADDRESS" in env:
    kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(env["JAX_NUM_PROCESSES"]),
              process_id=int(env["JAX_PROCESS_ID"]))
  elif flag == "1" or _cluster_in_env(env):
    kw = {}
  else:
    return False
  try:
    jax.distributed.initialize(**kw)
  except RuntimeError as e:
    raise RuntimeError(
        f"jax.distributed.initialize failed ({e}). A multi-process run must "
        "start it before any JAX computation: call baq.launch.start() (or "
        "baq.launch.initialize_distributed()) first thing in your script.") from e
  return True


def seeds(config: Any) -> list[int]:
  """`config.seeds` of a multi-seed driver, checked before any work.

  Raises:
    ValueError: missing, empty, not integers >= 0, or repeated (a repeated
      seed would count one run twice in every mean and paired test).
  """
  given = config.get("seeds") if hasattr(config, "get") else None
  if given is None:
    raise ValueError("This driver runs every seed of config.seeds, and the config has none: "
                     'set --config.seeds="(0,1,2)".')
  values = list(given) if isinstance(given, (tuple, list)) else [given]
  if not values or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in values):
    raise ValueError(f"config.seeds={given!r} must be a non-empty tuple of integers >= 0, "
                     'e.g. --config.seeds="(0,1,2)".')
  if len(set(values)) != len(values):
    raise ValueError(f"config.seeds={given!r} repeats a seed.")
  return values


def is_primary() -> bool:
  """True on the one process that writes shared files (reports, plans, exports)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def primary_first(fn: Callable[[], Any], name: str) -> Any:
  """`fn()` on process 0 first, then, after a barrier, on the others.

  For work that leaves files behind the first time (a dataset prepared
  under its data_dir, a corpus written to a workdir): one process writes
  them, the others find them made, so processes sharing a disk never race.
  With one process it is just `fn()`.

  Args:
    fn: what every process runs.
    name: the barrier's name (the same on every process).

  Returns:
    This process's `fn()`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  out = fn() if is_primary() else None
  multihost_utils.sync_global_devices(name)
  return out if is_primary() else fn()


def quiet_logging() -> None:
  """Keeps the console to baq's progress lines: libraries log warnings only,
  and tensorflow-datasets shows no progress bars."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
  except ImportError:
    pass


def define_flags(config: Optional[str], *, config_help: str = "Config file.",
                 workdir_help: str = "Directory of everything the run writes.") -> None:
  """--config (file, default `config`; fields overridable) and --workdir (required).

  Args:
    config: the default config file; None makes --config optional with no
      default (eval.py reads WORKDIR/config.json then).
    config_help, workdir_help: the flags' help strings.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  # ml_collections applies the command line's overrides to the default config
  # as the flag is defined: a missing field is refused here, by name.
  _refuse_missing_overrides(config)
  config_flags.DEFINE_config_file("config", config, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["workdir"])
  # Key flags of the calling entry point, so that its --help lists them.
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  caller = sys.argv[0] if caller == "__main__" else caller  # as absl names a main module
  for name in ("config", "workdir"):
    FLAGS.register_key_flag_for_module(caller, FLAGS[name])


def check_overrides(argv: Sequence[str], default: Optional[str]) -> None:
  """Refuses a `--config.a.b=value` that names no field of the config, listing
  the fields there are, before absl parses the flags.

  ml_collections can only change fields a config has; for a missing one it
  raises a bare `KeyError: 'b'` while the flags are parsed. The config file
  (--config=FILE[:ARG], else `default`) is loaded here to say which.

  Raises:
    app.UsageError: an override names a missing field.
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv[1:]
               if a.startswith("--config.")]
  if not overrides:
    return
  given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  spec = (given[-1] if given else default or "").strip("'\"")
  if not spec:
    return
  path, _, arg = spec.partition(":")
  try:
    import importlib.util  # pylint: disable=import-outside-toplevel
    module_spec = importlib.util.spec_from_file_location("_baq_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return  # a config that does not load is absl's to report, as before
  for dotted in overrides:
    node, walked = config, []
    for key in dotted.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else None
      if keys is None:
        break  # a leaf with more dots: absl says what is wrong
      if key not in node:
        where = ".".join(["config"] + walked)
        raise app.UsageError(
            f"--config.{dotted}: {where} has no field {key!r}; it has: "
            f"{', '.join(sorted(map(str, keys)))}. An override changes a field the config "
            "has; a new entry (a penalty, a model option) goes in a config file.")
      node, walked = node[key], walked + [key]


def _refuse_missing_overrides(default: Optional[str]) -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  try:
    check_overrides(sys.argv, default)
  except app.UsageError as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
    sys.exit(1)


def start(argv: Sequence[str], check: Optional[Callable[[Any], Any]] = None
          ) -> tuple[Any, str]:
  """The setup of every entry point; returns (config, workdir) of the flags.

  Args:
    argv: what absl left of the command line; anything but the program
      name is refused (a mistyped flag is no positional argument).
    check: called with the config (if one was given) after logging is set
      up; it raises on a value that cannot run, before any work.

  Returns:
    (FLAGS.config, FLAGS.workdir); None for a flag the program does not define.

  Raises:
    app.UsageError: positional arguments.
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}; every option is a "
                         "flag (--config, --workdir, --config.FIELD=VALUE).")
  initialize_distributed()
  if not FLAGS["verbosity"].present:
    quiet_logging()
  config = FLAGS.config if "config" in FLAGS else None
  if check is not None and config is not None:
    check(config)
  return config, FLAGS.workdir if "workdir" in FLAGS else None
