"""Checkpoints of a run's whole train state with orbax.

The train state is a plain dict (step, params, batch_stats, opt_state,
penalty_state, rng, data position) saved with `ocp.args.StandardSave` and
restored into its abstract shape with `StandardRestore`; when the abstract
state carries shardings, arrays are restored onto them, whatever device
layout wrote the checkpoint. Beside the checkpoints the workdir holds
`state_signature.json`, the path -> shape/dtype map of the state; a workdir
whose signature differs from the run about to start is refused with a
message instead of being half-restored or overwritten. On several hosts
every process saves and restores (orbax coordinates them); only process 0
writes the signature.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from baq import workdir as wd
from baq.launch import is_primary

SIGNATURE_FILE = wd.SIGNATURE_FILE


def signature(state: Any) -> dict[str, str]:
  """Path -> "dtype[shape]" for every leaf of a (possibly abstract) pytree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(p): f"{np.dtype(v.dtype).name}{list(v.shape)}"
          for p, v in flat}


# orbax keeps process-wide state for its asynchronous saves (the temporary
# directories it finalises in the background): two managers saving the same
# step at once from two threads (`baq.experiment.lanes`) collided on them. Saves
# made off the main thread are therefore serialised and finished before the
# next begins (a small model's save takes well under a second).
_LANE_LOCK = threading.RLock()


class Checkpointer:
  """Saves and restores one run's train state under `workdir/checkpoints`.

  Args:
    workdir: the run's directory.
    abstract_state: the state's shapes/dtypes (e.g. `jax.eval_shape` output).
    max_to_keep: number of checkpoints kept.

  Raises:
    ValueError: the workdir holds a checkpoint of an incompatible run.
  """

  def __init__(self, workdir: str, abstract_state: Any, max_to_keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.abstract_state = abstract_state
    os.makedirs(self.workdir, exist_ok=True)
    self._check_signature(signature(abstract_state))
    with _LANE_LOCK:
      self.manager = ocp.CheckpointManager(
          os.path.join(self.workdir, wd.CHECKPOINT_DIR),
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def _check_signature(self, sig: dict[str, str]) -> None:
    path = os.path.join(self.workdir, SIGNATURE_FILE)
    has_ckpt = os.path.isdir(os.path.join(self.workdir, wd.CHECKPOINT_DIR)) and any(
        d.isdigit() for d in os.listdir(os.path.join(self.workdir, wd.CHECKPOINT_DIR)))
    if os.path.exists(path) and has_ckpt:
      with open(path) as f:
        old = json.load(f)
      if old != sig:
        diff = sorted(set(old.items()) ^ set(sig.items()))[:4]
        raise ValueError(
            f"Workdir {self.workdir} holds a checkpoint of an incompatible run "
            f"(train state differs, e.g. at {diff}). Use a fresh --workdir or "
            "the config that wrote it.")
    elif has_ckpt:
      raise ValueError(
          f"Workdir {self.workdir} holds checkpoints but no {SIGNATURE_FILE}; "
          "refusing to guess whether they match this run. Use a fresh --workdir.")
    if is_primary():
      with open(path, "w") as f:
        json.dump(sig, f, indent=1, sort_keys=True)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, step: Optional[int] = None) -> Any:
    """The state saved at `step` (default: latest), typed like abstract_state."""
    step = self.manager.latest_step() if step is None else step
    with _LANE_LOCK:
      return self.manager.restore(step, args=ocp.args.StandardRestore(self.abstract_state))

  def save(self, step: int, state: Any, force: bool = False) -> None:
    """Saves asynchronously; from a lane's thread, under a process-wide lock and finished."""
    if threading.current_thread() is threading.main_thread():
      self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
      return
    with _LANE_LOCK:
      self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
      self.manager.wait_until_finished()

  def close(self) -> None:
    with _LANE_LOCK:
      self.manager.wait_until_finished()
      self.manager.close()


def restore_variables(workdir: str) -> dict:
  """The model variables of the latest checkpoint in a run's workdir.

  Used to fine-tune from another run (e.g. quantized models from the float
  model) and to evaluate it. The arrays come back as host numpy arrays, so a
  checkpoint written on any device layout loads in any process.

  Returns:
    {"params": ..., "batch_stats": ...} (batch_stats empty for models
    without BatchNorm).

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), wd.CHECKPOINT_DIR)
  with _LANE_LOCK:
    return _restore_host(ckpt_dir, workdir)


def _restore_host(ckpt_dir: str, workdir: str) -> dict:
  mgr = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler(),
                              options=ocp.CheckpointManagerOptions(create=False)) \
      if os.path.isdir(ckpt_dir) else None
  if mgr is None or mgr.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint to start from in {workdir}.")
  step = mgr.latest_step()
  meta = mgr.item_metadata(step)
  # numpy targets: restored on the host, not onto the devices that saved it.
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), getattr(meta, "tree", meta))
  state = mgr.restore(step, args=ocp.args.StandardRestore(target))
  mgr.close()
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def restore_params(workdir: str) -> Any:
  """The params of the latest checkpoint in a run's workdir (`restore_variables`)."""
  return restore_variables(workdir)["params"]
