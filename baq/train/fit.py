"""A small supervised trainer for the studies' in-run models: build, step, loop.

The embedded language model (`lm_loss` on token ids) and the embedded CLIP
(a contrastive loss on images and captions) are trained with it; a model is
a loss function `loss(params, batch) -> scalar` and a batch function
`batch(rows) -> batch` of the rows a step draws.

The state is a plain dict (step, params, opt_state) checkpointed with
`baq.train.checkpoint.Checkpointer`; the batch of step s is a function of
(seed, s) alone, so an interrupted run resumes exactly where it stopped and
gives the same parameters as one that never stopped. A non-finite loss stops
the run before that step is saved, so the last good checkpoint stays the
latest, and raises FloatingPointError naming the step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from baq.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """The optimisation (every bound is checked before any work).

  Attributes:
    steps: optimizer steps.
    batch_size: sequences per step.
    lr: peak AdamW learning rate (warmup then cosine decay to 10 %).
    warmup_steps: linear warmup.
    weight_decay: AdamW decay.
    seed: the initialisation and batch-order seed.
    save_every: checkpoint period in steps (and the last step).
  """
  steps: int = 600
  batch_size: int = 32
  lr: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 0.01
  seed: int = 0
  save_every: int = 200

  def __post_init__(self):
    for name in ("steps", "batch_size", "save_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if not (np.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"lr must be finite and > 0, got {self.lr}.")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got "
                       f"{self.warmup_steps}.")


def optimizer(cfg: FitConfig) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1), cfg.steps,
                                             end_value=0.1 * cfg.lr)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, weight_decay=cfg.weight_decay))


def lm_loss(logits: jax.Array, ids: jax.Array, lengths: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over real (non-padding) target tokens."""
  targets = ids[:, 1:]
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  mask = (jnp.arange(1, ids.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_step(loss_fn: Callable[[Any, Any], jax.Array], cfg: FitConfig):
  """The jitted update: (state, batch) -> (state, loss)."""
  tx = optimizer(cfg)

  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  return jax.jit(step, donate_argnums=0)


def batch_indices(cfg: FitConfig, step: int, n: int) -> np.ndarray:
  """Rows of step `step`: a function of (seed, step) only, for exact resumption."""
  return np.random.default_rng([cfg.seed, step]).integers(0, n, cfg.batch_size)


class _Replicas:
  """How `fit`'s state crosses into checkpoints in a multi-process job.

  Every process trains the same steps on the same rows on its own device,
  with the programs of a one-process run (so the numbers are that run's);
  orbax saves and restores global arrays, so a checkpoint sees the state as
  one array replicated over one device of each process.
  """

  def __init__(self):
    self.sharding = None
    if jax.process_count() > 1:
      devices = np.array([next(d for d in jax.devices() if d.process_index == p)
                          for p in range(jax.process_count())])
      mesh = jax.sharding.Mesh(devices, ("process",))
      self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def abstract(self, tree):
    if self.sharding is None:
      return tree
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding),
                        tree)

  def to_global(self, tree):
    if self.sharding is None:
      return tree
    mine = self.sharding.addressable_devices
    return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
        x.shape, self.sharding, [jax.device_put(x, d) for d in mine]), tree)

  def to_local(self, tree):
    if self.sharding is None:
      return tree
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


def fit(params: Any, loss_fn: Callable[[Any, Any], jax.Array],
        batch_fn: Callable[[np.ndarray], Any], num_rows: int, cfg: FitConfig,
        workdir: Optional[str] = None) -> tuple[Any, list[float]]:
  """Trains (or resumes, or loads when finished) params on `loss_fn`.

  Args:
    params: the initial parameters.
    loss_fn: (params, batch) -> scalar loss.
    batch_fn: row indices [batch_size] -> the batch `loss_fn` takes.
    num_rows: rows of the training set.
    cfg: the optimisation.
    workdir: checkpoint directory (None: no checkpoints).

  Returns:
    (params, losses of the steps run in this call).
  """
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer(cfg).init(params)}
  replicas = _Replicas()
  ckpt = None if workdir is None else Checkpointer(
      workdir, replicas.abstract(jax.eval_shape(lambda: state)))
  if ckpt is not None and ckpt.latest_step() is not None:
    state = replicas.to_local(ckpt.restore())
  step_fn, losses = make_step(loss_fn, cfg), []
  try:
    for s in range(int(state["step"]), cfg.steps):
      new, loss = step_fn(state, batch_fn(batch_indices(cfg, s, num_rows)))
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(
            f"Loss is {loss} at step {s}; stopped. The last good checkpoint "
            f"(step {None if ckpt is None else ckpt.latest_step()}) is intact.")
      state, losses = new, losses + [loss]
      if ckpt is not None and ((s + 1) % cfg.save_every == 0 or s + 1 == cfg.steps):
        ckpt.save(s + 1, replicas.to_global(state))
      if (s + 1) % 100 == 0:
        log.info("step %d loss %.4f", s + 1, loss)
  finally:
    if ckpt is not None:
      ckpt.close()
  return jax.device_get(state["params"]), losses


def train_lm(model, ids: np.ndarray, lengths: np.ndarray, cfg: FitConfig,
             workdir: Optional[str] = None) -> tuple[Any, list[float]]:
  """A causal LM from its init on right-padded sequences (`fit` with `lm_loss`)."""
  params = model.init(jax.random.key(cfg.seed), jnp.zeros((1, ids.shape[1]), jnp.int32))["params"]
  loss = lambda p, b: lm_loss(model.apply({"params": p}, b[0]), b[0], b[1])
  batch = lambda rows: (jnp.asarray(ids[rows]), jnp.asarray(lengths[rows]))
  return fit(params, loss, batch, len(ids), cfg, workdir)
