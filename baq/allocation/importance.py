"""Group-aware importance of each bit unit, and reducers across groups.

FairQuant's first stage. For every quantized unit u (a layer, or one output
channel of it), every group g and every candidate bit-width k, a *measure*
estimates how much quantizing u to k bits raises group g's loss:

  grad         sum_i |g_i| |dw_i|            first-order magnitude bound
  grad_weight  (sum_i g_i dw_i)^2           GRAPE: squared first-order term
  hessian      1/2 tr(H_u)/n_u ||dw_u||^2   HAWQ-V2 (Hutchinson trace)
  hessian_diag 1/2 sum_i H_ii dw_i^2         (Hutchinson diagonal)
  loss         L_g(w + dw) - L_g(w)           measured: the unit alone quantized,
                                             every other weight float

where g is the gradient and H the Hessian of the group's mean loss with
respect to the kernel, and dw = Q_k(w) - w the quantization error at k bits.
The Taylor measures extrapolate from w; `loss` evaluates the calibration
loss at the quantized kernel itself (one forward pass of the calibration
sample per layer and choice, per channel for channel units), so it holds
far from w, where a second-order term need not (2 bits on a large layer).
A unit's *importance* is the same formula with dw = -w (the cost of removing
it), which orders units for FairQuant's quantile baseline and for plots.

A *reducer* combines the groups' [G, ...] values into one per unit: max,
mean, CVaR(alpha), balanced (each group divided by its own total importance,
then max) or subtractive (unprivileged minus beta times privileged; two
groups only). Both are registries: a new measure or reducer is one
decorated function.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from baq.registry import Registry
from baq.allocation import curvature
from baq.fairness.losses import cvar_of


class KernelStats(NamedTuple):
  """Per-group curvature statistics of one kernel.

  Attributes:
    grad: [G, *kernel shape] gradient of each group's mean loss.
    hess_diag: [G, *kernel shape] Hutchinson diagonal of each group's
      Hessian, or None when no measure asked for it.
    hess_trace: [G] trace of each group's Hessian block of the whole kernel
      (layer units), or None; per-channel traces come from `hess_diag`.
  """

  grad: jax.Array
  hess_diag: jax.Array | None = None
  hess_trace: jax.Array | None = None


class Measure(NamedTuple):
  """An importance measure.

  Attributes:
    fn: (stats, dw, per_channel, **kwargs) -> [G] or [G, C] per unit.
    hessian: which curvature it reads: None, "trace" (the kernel's block
      trace, or per-channel traces) or "diag" (the Hessian diagonal); or
      "forward": fn's first argument is then, instead of KernelStats,
      loss_delta(dw) -> [G], each group's calibration loss increase when dw
      is added to the kernel (`baq.allocation.planner.analyse` builds it).
  """

  fn: Callable[..., jax.Array]
  hessian: str | None = None


MEASURES: Registry[Measure] = Registry("importance measure")
REDUCERS: Registry[Callable[..., np.ndarray]] = Registry("reducer")


HESSIAN_KINDS = (None, "trace", "diag", "forward")


def unit_sum(x: jax.Array, per_channel: bool) -> jax.Array:
  """[G, *shape] -> [G] (layer unit) or [G, C] (output-channel units)."""
  return curvature.unit_sum(x, per_channel, lead=1)


def register_measure(name: str, hessian: str | None = None):
  """Decorator registering fn(stats, dw, per_channel, **kw) as measure `name`.

  `hessian` says which curvature statistics it reads: None, "trace" or
  "diag"; "forward" measures get loss_delta(dw) -> [G] instead (see Measure).
  """
  if hessian not in HESSIAN_KINDS:
    raise ValueError(f"hessian must be one of {HESSIAN_KINDS}, got {hessian!r}.")

  def wrap(fn):
    MEASURES.register(name)(Measure(fn, hessian))
    return fn

  return wrap


@register_measure("grad")
def grad_magnitude(stats: KernelStats, dw: jax.Array, per_channel: bool) -> jax.Array:
  """sum |g| |dw| over the unit: bounds the first-order loss change."""
  return unit_sum(jnp.abs(stats.grad) * jnp.abs(dw)[None], per_channel)


@register_measure("grad_weight")
def grad_weight(stats: KernelStats, dw: jax.Array, per_channel: bool) -> jax.Array:
  """(sum g dw)^2 over the unit: GRAPE's squared first-order Taylor term."""
  return jnp.square(unit_sum(stats.grad * dw[None], per_channel))


@register_measure("hessian", hessian="trace")
def hessian_trace(stats: KernelStats, dw: jax.Array, per_channel: bool) -> jax.Array:
  """HAWQ-V2: 1/2 tr(H_u)/n_u ||dw_u||^2, the unit's mean curvature times its error.

  Negative curvature estimates (probe noise, or a group sitting away from a
  minimum of its own loss) are taken as zero: a second-order term that
  claims quantization lowers the loss would pull bits *away* from a unit.
  """
  if stats.hess_trace is not None and not per_channel:
    trace = stats.hess_trace
  else:
    trace = unit_sum(stats.hess_diag, per_channel)
  n = dw.size // (dw.shape[-1] if per_channel else 1)
  return 0.5 * jnp.maximum(trace, 0.0) / n * unit_sum(jnp.square(dw)[None], per_channel)


@register_measure("hessian_diag", hessian="diag")
def hessian_diag(stats: KernelStats, dw: jax.Array, per_channel: bool) -> jax.Array:
  """1/2 sum_i max(H_ii, 0) dw_i^2: the diagonal second-order term."""
  h = jnp.maximum(stats.hess_diag, 0.0)
  return 0.5 * unit_sum(h * jnp.square(dw)[None], per_channel)


@register_measure("loss", hessian="forward")
def measured_loss(loss_delta: Callable[[jax.Array], jax.Array], dw: jax.Array,
                  per_channel: bool) -> jax.Array:
  """Each group's measured loss increase with the unit quantized, all else float.

  Channel units are measured one at a time (one pass per channel and choice).
  """
  if not per_channel:
    return jnp.asarray(loss_delta(dw))
  eye = jnp.eye(dw.shape[-1], dtype=dw.dtype)
  return jnp.stack([jnp.asarray(loss_delta(dw * eye[c])) for c in range(dw.shape[-1])], -1)


def evaluate_measure(name: str, stats: KernelStats, w: jax.Array, dws: Sequence[jax.Array],
                     per_channel: bool, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """One kernel's importance and sensitivity table under measure `name`.

  Args:
    name: a registered measure.
    stats: the kernel's per-group statistics (a "forward" measure's
      loss_delta function).
    w: the float kernel.
    dws: quantization errors Q_k(w) - w, one per candidate bit-width.
    per_channel: units are output channels (else the whole kernel).
    **kwargs: the measure's options.

  Returns:
    importance [G, units] and sensitivity [G, units, K].
  """
  fn = MEASURES.get(name).fn
  imp = fn(stats, -w, per_channel, **kwargs)
  sens = jnp.stack([fn(stats, dw, per_channel, **kwargs) for dw in dws], -1)
  imp, sens = np.asarray(imp, np.float64), np.asarray(sens, np.float64)
  if not per_channel:
    imp, sens = imp[:, None], sens[:, None]
  return imp, sens


# ---------------------------------------------------------------- reducers
# Each reducer maps values [G, ...] to [...], given `mass` [G] (each group's
# total importance over all units; only `balanced` uses it).


@REDUCERS.register("max")
def reduce_max(values: np.ndarray, mass: np.ndarray) -> np.ndarray:
  """The most affected group's value."""
  del mass
  return np.max(values, 0)


@REDUCERS.register("mean")
def reduce_mean(values: np.ndarray, mass: np.ndarray) -> np.ndarray:
  """The groups' plain mean (every group weighs the same, whatever its size)."""
  del mass
  return np.mean(values, 0)


@REDUCERS.register("cvar")
def reduce_cvar(values: np.ndarray, mass: np.ndarray, alpha: float = 0.34) -> np.ndarray:
  """Mean of the worst alpha-fraction of groups (1: mean, -> 0: max)."""
  del mass
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"cvar alpha must lie in (0, 1], got {alpha}.")
  flat = jnp.asarray(values.reshape(values.shape[0], -1).T)
  present = jnp.ones(values.shape[0], bool)
  out = jax.vmap(lambda v: cvar_of(v, present, alpha))(flat)
  return np.asarray(out, np.float64).reshape(values.shape[1:])


@REDUCERS.register("balanced")
def reduce_balanced(values: np.ndarray, mass: np.ndarray) -> np.ndarray:
  """Each group divided by its own total importance, then the max.

  A group whose losses are large everywhere (a hard group) no longer claims
  every bit; what counts is where, relative to itself, it is most sensitive.
  """
  scale = np.where(mass > 0, mass, 1.0).reshape((-1,) + (1,) * (values.ndim - 1))
  return np.max(values / scale, 0)


@REDUCERS.register("subtractive")
def reduce_subtractive(values: np.ndarray, mass: np.ndarray, beta: float = 1.0,
                       unprivileged: int = 1) -> np.ndarray:
  """Unprivileged minus beta times privileged: bits go where they help the
  unprivileged group more than the privileged one. Two groups only."""
  del mass
  if values.shape[0] != 2:
    raise ValueError(
        f"The subtractive reducer needs exactly 2 groups, got {values.shape[0]}. "
        "Use a binary grouping (e.g. Fitzpatrick 1-3 vs 4-6) or another reducer "
        f"({', '.join(n for n in REDUCERS.names() if n != 'subtractive')}).")
  if unprivileged not in (0, 1):
    raise ValueError(f"unprivileged must be group 0 or 1, got {unprivileged}.")
  return values[unprivileged] - beta * values[1 - unprivileged]


def reduce(name: str, values: np.ndarray, mass: np.ndarray, **kwargs) -> np.ndarray:
  """Applies reducer `name` (unknown names list the valid ones)."""
  return REDUCERS.get(name)(np.asarray(values, np.float64), np.asarray(mass, np.float64),
                            **kwargs)
