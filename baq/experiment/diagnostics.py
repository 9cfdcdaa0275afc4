"""The "disparately skews" analysis: per-group statistics before and after quantization.

For the float model and every quantized model of a workdir, per group:
logit variance, loss and accuracy on the whole test split, and on a
group-balanced diagnostic batch the gradient norm, the Hessian trace
(forward-over-forward Hutchinson, with its standard error) and the top Hessian eigenvalue (power
iteration), all with respect to the weights (bit-width leaves held fixed).
Quantized models are taken as deployed (integer bits, straight-through
rounding), so their curvature is the loss's at the quantized point.

`diagnose_workdir` (eval.py --diagnostics) writes WORKDIR/diagnostics.json,
WORKDIR/diagnostics.png (every statistic per group, every model) and, when
a model has a bit allocation, WORKDIR/bits_vs_importance.png.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.traverse_util as tu
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import curvature, eigen, statistics
from baq.data.pipeline import normalize
from baq.fairness import losses
from baq.models import build_model
from baq.quant.inject import QUANT_LEAVES
from baq import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import predict_logits
from baq.train.modes import selected
from baq import launch
from baq.launch import is_primary
from baq.variables import apply_model

STATS = ("accuracy", "loss", "logit_variance", "grad_norm", "hessian_trace", "top_eigenvalue")


def _split_weights(params: Any) -> tuple[dict, dict]:
  flat = tu.flatten_dict(dict(params))
  fixed = {k: v for k, v in flat.items() if k[-1] in QUANT_LEAVES}
  return {k: v for k, v in flat.items() if k not in fixed}, fixed


def output_statistics(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                      num_groups: int) -> dict:
  """Per-group accuracy, mean loss and logit variance of predictions.

  Logit variance is, per example, the variance of its logit vector across
  classes, averaged over the group's examples: quantization that flattens
  the logits (the paper's "lower logit variance") lowers it.
  """
  per_ex = np.asarray(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  correct = (logits.argmax(-1) == labels).astype(np.float64)
  var = np.var(logits, axis=-1)
  out = {}
  for name, v in (("accuracy", correct), ("loss", per_ex), ("logit_variance", var)):
    out[name] = [float(np.mean(v[groups == g])) if np.any(groups == g) else float("nan")
                 for g in range(num_groups)]
  return out


def curvature_statistics(apply_fn: Callable, params: Any, batch: dict, num_groups: int, *,
                         key: jax.Array, num_probes: int = 64, probe_chunk: int = 8,
                         max_iters: int = 100, tol: float = 1e-3) -> dict:
  """Per-group gradient norm, Hessian trace and top eigenvalue on one batch.

  Args:
    apply_fn: (params, images) -> logits.
    params: the model's parameters; bit-width and range leaves stay fixed.
    batch: `image`, `label`, `group` (and optional `mask`) arrays.
    num_groups: G.
    key: PRNG key of the probes and the power-iteration start.
    num_probes: Hutchinson probes.
    probe_chunk: probes vmapped at once.
    max_iters: power-iteration cap.
    tol: power-iteration relative tolerance.

  Returns:
    dict of [G] lists: grad_norm, hessian_trace (of all weights together),
    hessian_trace_stderr (over probes), top_eigenvalue, eigen_converged;
    and eigen_iterations.
  """
  weights, fixed = _split_weights(params)
  flat_w, unravel = jax.flatten_util.ravel_pytree(
      {"/".join(k): v for k, v in weights.items()})

  def full(v):  # one flat weight vector: the trace's probes are whole-model
    flat = {tuple(k.split("/")): x for k, x in unravel(v).items()}
    flat.update(fixed)
    return tu.unflatten_dict(flat)

  gl = curvature.group_loss_fn(lambda v, x: apply_fn(full(v), x), batch, num_groups)
  k1, k2 = jax.random.split(key)
  grad_norm = jnp.linalg.norm(jax.jit(jax.jacrev(gl))(flat_w), axis=1)

  def per_example(v):
    return losses.cross_entropy(apply_fn(full(v), batch["image"]), batch["label"])

  est = jax.jit(lambda v: curvature.group_traces(
      per_example, v, batch["group"], num_groups, k1, num_probes=num_probes,
      probe_chunk=probe_chunk))(flat_w)
  eig = eigen.top_eigenvalues(gl, flat_w, k2, num_groups, max_iters=max_iters, tol=tol)
  tolist = lambda x: np.asarray(x, np.float64).tolist()
  return dict(grad_norm=tolist(grad_norm), hessian_trace=tolist(est.trace),
              hessian_trace_stderr=tolist(est.stderr),
              top_eigenvalue=tolist(eig.eigenvalue),
              eigen_converged=np.asarray(eig.converged).tolist(),
              eigen_iterations=int(eig.iterations))


def diagnostic_batch(split, per_group: int, seed: int) -> dict:
  """A group-balanced batch of up to `per_group` examples per group."""
  sub = statistics.calibration_split(split, per_group, seed)
  return {"image": jnp.asarray(normalize(sub.images)), "label": jnp.asarray(sub.labels),
          "group": jnp.asarray(sub.groups)}


def model_diagnostics(apply_fn: Callable, params: Any, split, batch: dict,
                      dc: ml_collections.ConfigDict, key: jax.Array,
                      logits: np.ndarray) -> dict:
  """Every statistic of one model: output statistics on the whole split,
  curvature on the diagnostic batch."""
  out = output_statistics(logits, split.labels, split.groups, split.num_groups)
  out.update(curvature_statistics(apply_fn, params, batch, split.num_groups, key=key,
                                  num_probes=dc.num_probes, probe_chunk=dc.probe_chunk,
                                  max_iters=dc.max_iters, tol=dc.tol))
  return out


def skew_summary(models: dict, float_name: str) -> dict:
  """Quantized/float ratios per group, and whether the worst group's rise most.

  The worst group is the float model's lowest-accuracy group. For each
  quantized model and each of grad_norm, hessian_trace and top_eigenvalue,
  reports the worst group's ratio, the other groups' median ratio, and
  `worst_rises_more` (the worst group's ratio exceeds every other group's
  median).
  """
  base = models[float_name]
  acc = np.asarray(base["accuracy"])
  worst = int(np.nanargmin(acc))
  out = {"worst_group": worst}
  for name, m in models.items():
    if name == float_name:
      continue
    entry = {}
    for stat in ("grad_norm", "hessian_trace", "top_eigenvalue", "loss", "logit_variance"):
      ratio = np.asarray(m[stat]) / np.where(np.asarray(base[stat]) != 0,
                                             np.asarray(base[stat]), np.nan)
      others = np.delete(ratio, worst)
      entry[stat] = dict(ratio=ratio.tolist(), worst=float(ratio[worst]),
                         others_median=float(np.nanmedian(others)),
                         worst_rises_more=bool(ratio[worst] > np.nanmedian(others)))
    out[name] = entry
  return out


def plot_statistics(path: str, models: dict, group_names) -> None:
  """One panel per statistic: per-group bars for every model."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(models)
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
  x = np.arange(len(group_names))
  width = 0.8 / len(names)
  for ax, stat in zip(axes.ravel(), STATS):
    for i, n in enumerate(names):
      ax.bar(x + (i - (len(names) - 1) / 2) * width, models[n][stat], width, label=n)
    ax.set_xticks(x, group_names)
    ax.set_title(stat.replace("_", " "))
    if stat in ("hessian_trace", "top_eigenvalue", "grad_norm"):
      ax.set_yscale("log")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Per-group statistics, float vs quantized")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_bits_vs_importance(path: str, plan: dict, allocations: dict) -> None:
  """Bits per unit against its reduced importance, one series per method."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  imp = np.maximum(np.asarray(plan["importance"], np.float64), 1e-30)
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, bits) in enumerate(allocations.items()):
    jitter = (i - (len(allocations) - 1) / 2) * 0.08
    ax.scatter(imp, np.asarray(bits) + jitter, s=18, label=name, alpha=0.8)
  ax.set_xscale("log")
  ax.set_xlabel(f"importance ({plan['measure']}, {plan['reducer']} over groups)")
  ax.set_ylabel("bits")
  ax.set_title("Bits per unit against group-aware importance")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def diagnose_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Diagnostics of every model in a train.py workdir (eval.py --diagnostics).

  Models: fp32, each uniform<B> baseline (QAT) and its round-to-nearest
  version (_ptq), each runtime baseline (nf4, ...: straight-through
  gradients) and each method, all evaluated as deployed; the settings
  are `config.diagnostics`.

  Returns:
    The dict written to WORKDIR/diagnostics.json.
  """
  from baq.experiment import deploy, job as experiment  # pylint: disable=import-outside-toplevel

  if "diagnostics" not in config:
    raise ValueError("The config has no `diagnostics` section (an older workdir's "
                     "config.json?): pass --config=configs/default.py or your own config.")
  dc = config.diagnostics
  data = experiment.load_data(config)
  test = data["test"]
  batch = diagnostic_batch(test, dc.per_group, config.seed)
  float_vars = restore_variables(wd.float_dir(config, workdir))
  runs = {wd.FLOAT: (build_model(config.model.name, test.num_classes, None,
                                 **config.model.kwargs.to_dict()), float_vars)}
  runs.update({name: (model, variables) for name, model, variables in
               experiment.baseline_runs(config, workdir, test.num_classes, float_vars, test)})
  allocations = {}
  for mode in selected(config):
    if mode != "float":
      name = wd.method_name(config, mode)
      model, _, deployed, ints, _, _ = deploy.deployed_run(config, workdir, mode,
                                                           test.num_classes)
      runs[name], allocations[name] = (model, deployed), ints.tolist()
  runs = _chosen(runs, dc.models)
  models = {}
  for i, (name, (model, variables)) in enumerate(runs.items()):
    apply_fn = lambda p, x, m=model, v=variables: apply_model(m, dict(v, params=p), x)
    logits = predict_logits(model, variables, test, config.eval_batch_size)
    models[name] = model_diagnostics(apply_fn, variables["params"], test, batch, dc,
                                     jax.random.key(config.seed * 1000 + i), logits)
    if launch.is_primary():
      print(f"[diagnostics] {name}: worst-group acc {np.nanmin(models[name]['accuracy']):.4f}, "
            f"trace per group {np.round(models[name]['hessian_trace'], 3).tolist()}",
            flush=True)
  out = dict(group_names=list(test.group_names), split=config.dataset.test_split,
             diagnostic_batch_per_group=np.bincount(np.asarray(batch["group"]),
                                                    minlength=test.num_groups).tolist(),
             models=models, skew=skew_summary(models, wd.FLOAT))
  if not is_primary():  # one writer on several hosts
    return out
  wd.write_json(wd.path(workdir, wd.DIAGNOSTICS_FILE), out)
  plot_statistics(wd.path(workdir, wd.DIAGNOSTICS_PLOT), models, test.group_names)
  if allocations:
    experiment.allocation_plan(config, workdir, float_vars, data)  # reused when saved
    plot_bits_vs_importance(wd.path(workdir, wd.IMPORTANCE_PLOT),
                            wd.read_json(wd.path(workdir, wd.PLAN_FILE)), allocations)
  print(f"diagnostics: {wd.path(workdir, wd.DIAGNOSTICS_FILE)}", flush=True)
  return out


def _chosen(runs: dict, models: str) -> dict:
  """The runs `diagnostics.models` names ("all", or comma-separated names with fp32)."""
  if models == "all":
    return runs
  keep = [m.strip() for m in models.split(",") if m.strip()]
  unknown = sorted(set(keep) - set(runs))
  if unknown or wd.FLOAT not in keep:
    raise ValueError(f"diagnostics.models must name {wd.FLOAT} and runs of this "
                     f"workdir; unknown: {unknown}. Valid: {', '.join(runs)}.")
  return {k: v for k, v in runs.items() if k in keep}
