"""Building a run: model, parameters, budget, optimizer, penalties, train state.

`create_train_state` is the one place a run is set up; the trainer's loop,
the benchmarks and the bias study all call it, so none retypes the set-up.
The train state is a plain dict (step, data_position, params, batch_stats,
opt_state, penalty_state, rng); batch_stats is empty for models without
BatchNorm.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from baq.variables import as_variables
from baq.fairness import regularizers
from baq.models import DEFAULT_DTYPE, build_model
from baq.quant import units
from baq.quant.inject import BITS_LEAF, QUANT_LEAVES, QuantMode
from baq.train.modes import ModeSpec, budget_bits, get_mode


def merge_params(init: dict, source: dict) -> dict:
  """`init` with every leaf that `source` has at the same path and shape.

  Used to start a quantized model (which has extra bit-width leaves) from a
  float checkpoint.

  Raises:
    ValueError: `source` lacks a leaf of `init` that is not quantizer state.
  """
  flat_init = tu.flatten_dict(dict(init))
  flat_src = tu.flatten_dict(dict(source))
  missing = [k for k in flat_init if k not in flat_src and k[-1] not in QUANT_LEAVES]
  if missing:
    raise ValueError(f"Checkpoint to start from lacks {['/'.join(k) for k in missing][:4]}.")
  for k, v in flat_src.items():
    if k in flat_init and np.shape(v) == np.shape(flat_init[k]):
      flat_init[k] = jnp.array(v)  # a copy: the new run donates its buffers
  return tu.unflatten_dict(flat_init)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, *, lr: float,
                   steps: int, train_bits: bool) -> optax.GradientTransformation:
  """AdamW with warmup-cosine for weights; plain Adam (or frozen) for bit-widths.

  Bit-width leaves are found by name, so any model gets the right optimizer.
  """
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, min(o.warmup_steps, max(steps // 10, 1)), max(steps, 2))
  weights = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                        optax.adamw(schedule, weight_decay=o.weight_decay))
  bits = optax.adam(o.bits_lr) if train_bits else optax.set_to_zero()
  labels = tu.path_aware_map(
      lambda path, _: "bits" if path[-1] == BITS_LEAF else "weights", params)
  return optax.multi_transform({"weights": weights, "bits": bits}, labels)


def build_penalties(config: ml_collections.ConfigDict, train_bits: bool) -> dict:
  """name -> (Regularizer, weight) from `config.penalties`.

  Penalties of the bit-widths (e.g. `bitrate`) apply only when bits train.
  """
  out = {}
  for name, entry in sorted(config.penalties.to_dict().items()):
    entry = dict(entry)
    weight = float(entry.pop("weight", 1.0))
    reg = regularizers.build(entry.pop("kind", name), **entry)
    if reg.needs_bits and not train_bits:
      continue
    out[name] = (reg, weight)
  return out


@functools.partial(jax.jit, static_argnums=0)
def model_variables(model, key: jax.Array, sample: jax.Array) -> dict:
  """`model.init` as one compiled program: {"params", maybe "batch_stats"}.

  Initialised op by op, every initializer compiles on its own (seconds each
  on CPU).
  """
  return model.init({"params": key, "quant": key}, sample)


def init_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation,
               penalties: dict, num_groups: int, rng: jax.Array) -> dict:
  """The train state at step 0 (a plain dict; see the module docstring)."""
  return dict(step=jnp.int32(0), data_position=jnp.int32(0), params=params,
              batch_stats=batch_stats, opt_state=tx.init(params), rng=jax.random.key_data(rng),
              penalty_state={n: r.init(num_groups) for n, (r, _) in penalties.items()})


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What a run is made of, besides its data and its loop.

  Attributes:
    model: the training-mode model.
    eval_model: the model as deployed (integer bits): validation and the
      final phase of a bit-training run.
    spec: the mode.
    layers: the bit-width units (`units.find_units`).
    budget: the average-bit budget (nan for modes without one).
    tx: the optimizer.
    penalties: name -> (Regularizer, weight).
    state: the train state at step 0 (unsharded).
    final_tx: the optimizer of the phase at integer bits: `tx` itself, or,
      with `quant.search_steps`, a fresh one whose schedule spans that phase.
  """

  model: Any
  eval_model: Any
  spec: ModeSpec
  layers: list
  budget: float
  tx: optax.GradientTransformation
  penalties: dict
  state: dict
  final_tx: Optional[optax.GradientTransformation] = None


def create_train_state(config: ml_collections.ConfigDict, mode: str, *, num_classes: int,
                       num_groups: int, image_shape: tuple, steps: int, lr: float,
                       bits: Optional[float] = None, use_penalties: bool = True,
                       init_variables: Optional[Any] = None,
                       init_bits: Optional[np.ndarray] = None) -> TrainSetup:
  """Builds the model, its step-0 state, optimizer and penalties for one run.

  Args:
    config: the experiment config.
    mode: a registered mode ("float", "qat", "baq", ...).
    num_classes: logits of the model.
    num_groups: groups of the data (penalty states).
    image_shape: one example's shape (H, W, C).
    steps: the run's total steps (the learning-rate schedule).
    lr: peak learning rate of the weights.
    bits: the bit-width of mode "qat".
    use_penalties: add `config.penalties` to the loss.
    init_variables: {"params", "batch_stats"} (or bare params) to start from,
      e.g. the float model's; the quantizer's own leaves stay at init.
    init_bits: integer bit-widths to start from, one per unit (an
      allocation); otherwise the mode's own start.

  Returns:
    The TrainSetup.
  """
  spec = get_mode(config, mode, bits)
  # A workdir's config.json from before `model.dtype` trains as it did.
  model = build_model(config.model.name, num_classes, spec.quantizer,
                      config.model.get("dtype", DEFAULT_DTYPE), **config.model.kwargs.to_dict())
  init_key, rng = jax.random.split(jax.random.key(config.seed))
  variables = model_variables(model, init_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if init_variables is not None:
    start = as_variables(init_variables)
    params = merge_params(params, start["params"])
    batch_stats = merge_params(batch_stats, start.get("batch_stats") or {})
  layers = units.find_units(params)
  budget = budget_bits(config, params, layers, batch_stats) if spec.uses_budget else float("nan")
  if init_bits is not None:
    params = units.scatter_bits(params, layers, np.asarray(init_bits, np.float32))
  elif spec.train_bits and config.quant.init_bits is None:
    params = units.scatter_bits(params, layers, np.full(len(units.unit_numels(layers)), budget))
  search = config.quant.get("search_steps") if spec.train_bits else None
  tx = make_optimizer(config, params, lr=lr, steps=steps if search is None else search,
                      train_bits=spec.train_bits)
  # The phase at integer bits gets a schedule of its own when the search has
  # its own steps; the bits stay frozen there whatever this optimizer says.
  final_tx = tx if search is None else make_optimizer(
      config, params, lr=lr, steps=max(steps - search, 1), train_bits=True)
  penalties = build_penalties(config, spec.train_bits) if use_penalties else {}
  eval_model = model.clone(quant=spec.quantizer.replace(mode=QuantMode.EVAL)) \
      if spec.quantizer else model
  return TrainSetup(model, eval_model, spec, layers, budget, tx, penalties,
                    init_state(params, batch_stats, tx, penalties, num_groups, rng), final_tx)
