"""Device mesh, sharding rules and multi-host input of the trainer.

The trainer's step is one `jax.jit` (the design card's pjit) with
`in_shardings`/`out_shardings` over a two-axis mesh ("data", "model") built
from `config.mesh`:

  * batches are split over "data";
  * parameters follow rules, regexes fully matched against a leaf's path
    ("params/layer1_0/conv1/kernel"); the first match wins. The caller
    prepends its own (the trainer keeps the quantizer's leaves replicated)
    to `RULES`: any leaf of at least `config.mesh.fsdp_min_numel` elements
    is sharded FSDP-style over "model" along its largest dimension divisible
    by the axis size; smaller ones (scales, biases, BatchNorm) are
    replicated;
  * optimizer moments are sharded like their parameters: a moment's path
    ends with its parameter's path and has its shape, so the same rules
    give the same spec; counters and penalty states are replicated.

The computation is written over the global batch, so group statistics
(segment sums over the batch) are the same whatever the layout: XLA inserts
the cross-device reductions.

Several hosts: `baq.launch.initialize_distributed` (every entry point's
first step) starts `jax.distributed`; each process then contributes
its rows of every global batch (`shard_batch`) and the checkpoint manager
coordinates the processes' writes.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "model")
REPLICATED, FSDP = "replicated", "fsdp"
# (regex fully matching a leaf path, REPLICATED | FSDP | a PartitionSpec).
RULES = ((r".*", FSDP),)
DEFAULT_MESH = dict(data=-1, model=1, fsdp_min_numel=2**18)


def mesh_config(config: ml_collections.ConfigDict) -> dict:
  """`config.mesh` with defaults for older configs."""
  return dict(DEFAULT_MESH, **(config.get("mesh") or {}))


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The ("data", "model") mesh of `config.mesh`.

  `data=-1` takes all devices left over by `model`. With both sizes given,
  a single process may use fewer devices than it has (the first ones).

  Raises:
    ValueError: the sizes do not fit the devices.
  """
  m, n = mesh_config(config), jax.device_count()
  model, data = int(m["model"]), int(m["data"])
  if model < 1 or (data != -1 and data < 1):
    raise ValueError(f"mesh sizes must be positive (data may be -1), got {m}.")
  if data == -1:
    if n % model:
      raise ValueError(f"mesh.model={model} does not divide the {n} devices.")
    data = n // model
  if data * model > n or (data * model < n and jax.process_count() > 1):
    raise ValueError(f"mesh data={data} x model={model} does not fit the {n} devices "
                     f"({jax.process_count()} processes); use data=-1.")
  return jax.make_mesh((data, model), AXES, devices=jax.devices()[:data * model],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def path_name(keypath) -> str:
  """A pytree key path as "a/b/0/c" (dict keys, attributes, indices)."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_spec(path: str, shape: tuple, model_size: int, min_numel: int, rules=RULES) -> P:
  """The PartitionSpec of one leaf by the first rule fully matching `path`."""
  kind = next((k for pattern, k in rules if re.fullmatch(pattern, path)), REPLICATED)
  if isinstance(kind, P):
    return kind
  if kind == REPLICATED or model_size == 1 or math.prod(shape) < min_numel:
    return P()
  dims = [i for i, d in enumerate(shape) if d % model_size == 0]
  if not dims:
    return P()
  axis = max(dims, key=lambda i: (shape[i], i))  # ties: the later (output) dim
  return P(*(("model" if i == axis else None) for i in range(len(shape))))


def state_shardings(mesh, abstract_state: Any, config: ml_collections.ConfigDict,
                    rules=RULES) -> Any:
  """NamedShardings of every leaf of a (possibly abstract) train state."""
  model_size = mesh.shape["model"]
  min_numel = int(mesh_config(config)["fsdp_min_numel"])
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, leaf_spec(path_name(p), np.shape(x), model_size,
                                                 min_numel, rules)), abstract_state)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Examples split over "data", replicated over "model"."""
  return NamedSharding(mesh, P("data"))


def jit_step(step_fn, mesh, shardings: Any):
  """`step_fn(state, batch) -> (state, metrics)` jitted over the mesh.

  The state keeps `shardings` (and its buffers are donated), the batch is
  split over "data", the metrics come back replicated.
  """
  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def process_rows(sharding: NamedSharding, n: int) -> np.ndarray:
  """Rows of an n-row global batch that this process's devices hold."""
  spans = {(s[0].start or 0, n if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map((n,)).values()}
  return np.concatenate([np.arange(a, b) for a, b in sorted(spans)])


def shard_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """A global batch (numpy, on every host) as arrays split over "data".

  Each process passes only its own rows to
  `jax.make_array_from_process_local_data`, so no host uploads another's.

  Raises:
    ValueError: the batch does not split evenly over the "data" axis.
  """
  sharding = batch_sharding(mesh)
  n = len(next(iter(batch.values())))
  if n % mesh.shape["data"]:
    raise ValueError(f"batch size {n} is not divisible by the mesh's data axis "
                     f"({mesh.shape['data']} devices); change batch_size or mesh.data.")
  rows = process_rows(sharding, n)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)[rows], np.shape(v))
          for k, v in batch.items()}


def shard_local_batch(local: Mapping[str, np.ndarray], n: int, mesh) -> dict[str, jax.Array]:
  """This process's rows (`process_rows`) of an n-row global batch as arrays
  split over "data": each host reads only its own examples."""
  sharding = batch_sharding(mesh)
  if n % mesh.shape["data"]:
    raise ValueError(f"batch size {n} is not divisible by the mesh's data axis "
                     f"({mesh.shape['data']} devices); change batch_size or mesh.data.")
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (n,) + np.shape(v)[1:])
          for k, v in local.items()}


def to_host(tree: Any) -> Any:
  """numpy copies of a tree of (possibly multi-host) arrays."""
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def put(tree: Any, shardings: Any) -> Any:
  """`tree` (numpy or arrays on any devices) placed on `shardings`."""
  return jax.device_put(tree, shardings)


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)
