r"""Every integer allocation of a small model at a budget, scored: where do the allocators land?

  python -m baq.experiment.exhaustive --workdir=W [--budget=3.0] [--choices=2,3,4,5,6,8]

Reads W's config and float model, lists every allocation that meets the
budget and wastes none of it (`baq.allocation.landscape.maximal`), applies
each to the float weights by round-to-nearest (no training), and scores it
on the validation and test splits: accuracy, worst-group accuracy and the
worst group's mean loss. It prints the distribution, the best allocations by
validation worst-group accuracy, and where the uniform allocation and every
allocation W holds (its `allocation_plan.json` and each finished method,
deployed) fall in it, and writes W/landscape_b<B>.json.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq import launch
from baq.allocation import landscape, planner
from baq.data.pipeline import normalize
from baq.fairness import losses
from baq.models import build_model
from baq.quant import units
from baq.quant.inject import QuantMode
from baq.experiment import checks, deploy, job as experiment
from baq import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import evaluate_split
from baq.train.modes import get_mode, run_steps, selected
from baq.train.loop import train
from baq.variables import apply_model


def scorer(config, split, fvars):
  """(fn(bits) -> [accuracy, worst-group accuracy, worst-group loss], layers)."""
  model = build_model(config.model.name, split.num_classes,
                      get_mode(config, "qat", 8).quantizer.replace(mode=QuantMode.EVAL),
                      **config.model.kwargs.to_dict())
  params = experiment.init_quantized(model, split, fvars["params"])
  layers = units.find_units(params)
  images, labels = jnp.asarray(normalize(split.images)), jnp.asarray(split.labels)
  groups, G = jnp.asarray(split.groups), split.num_groups

  @jax.jit
  def stats(bits):
    logits = apply_model(model, dict(fvars, params=units.scatter_bits(params, layers, bits)),
                         images)
    hit = (logits.argmax(-1) == labels).astype(jnp.float32)
    acc = losses.group_stats(hit, groups, G)
    loss = losses.group_stats(losses.cross_entropy(logits, labels), groups, G)
    return (hit.mean(), jnp.min(jnp.where(acc.present, acc.mean, jnp.inf)),
            jnp.max(jnp.where(loss.present, loss.mean, -jnp.inf)))

  return (lambda bits: np.asarray(stats(jnp.asarray(bits, jnp.float32)))), layers


def known_allocations(config, workdir: str, layers, budget: float, num_classes: int) -> dict:
  """name -> integer bits of every allocation the workdir holds at this budget."""
  out = {}
  plan_path = wd.path(workdir, wd.PLAN_FILE)
  if os.path.exists(plan_path):
    plan = wd.read_json(plan_path)
    if planner.matches(plan, layers, budget):
      out["allocation_plan"] = np.asarray(plan["bits"])
  for mode in selected(config):
    spec, run = get_mode(config, mode), wd.path(workdir, wd.method_name(config, mode))
    done = wd.finished(run, run_steps(config, spec)) if spec.trains else wd.has_checkpoints(run)
    if not (spec.uses_budget and done):
      continue
    ints = deploy.deployed_run(config, workdir, mode, num_classes)[3]
    if len(ints) == len(layers):
      out[wd.method_name(config, mode)] = np.asarray(ints)
  return out


def qat_scorer(config, workdir: str, data: dict, fvars: dict, steps: int, penalties: bool):
  """fn(bits) -> (val, test) score rows after fine-tuning the float model `steps` steps at bits.

  Each allocation trains as `fair_static_qat` does (WORKDIR/landscape/<bits>,
  resumed when interrupted), with the config's penalties when `penalties`.
  """
  mode = "fair_static_qat"
  model = build_model(config.model.name, data["test"].num_classes,
                      get_mode(config, mode).quantizer.replace(mode=QuantMode.EVAL),
                      **config.model.kwargs.to_dict())
  tag = "penalty" if penalties else "nopenalty"

  def score(bits):
    name = "_".join(str(int(b)) for b in bits)
    run = wd.path(workdir, "landscape", f"{tag}_{steps}", name)
    res = train(config, run, mode=mode, data=data, steps=steps, lr=config.optim.finetune_lr,
                init_variables=fvars, init_bits=np.asarray(bits), use_penalties=penalties,
                name=f"landscape {name}")
    variables = dict(params=res.params, batch_stats=res.batch_stats)
    out = []
    for split in (data["validation"], data["test"]):
      m = evaluate_split(model, variables, split, config.eval_batch_size)
      out.append(np.array([m["accuracy"], m["worst_group_accuracy"], np.nan]))
    return out

  return score


def survey(workdir: str, budget: float | None = None, choices: Sequence[int] | None = None,
           top: int = 10, qat_steps: int = 0, penalties: bool = False,
           config=None) -> dict:
  """Scores every maximal allocation at the budget; the JSON record (see the module doc).

  With `qat_steps` each allocation is fine-tuned that many steps before it
  is scored (`qat_scorer`), instead of round-to-nearest of the float model.
  `config` (default: the workdir's config.json) is checked first.
  """
  config = checks.load_config(workdir, config)
  data = experiment.load_data(config)
  fvars = restore_variables(wd.float_dir(config, workdir))
  budget = float(config.quant.target_bits if budget is None else budget)
  choices = tuple(choices or config.importance.choices)
  score_val, layers = scorer(config, data["validation"], fvars)
  score_test, _ = scorer(config, data["test"], fvars)
  if any(l.count != 1 for l in layers):
    raise ValueError("The landscape enumerates layer units; this config quantizes per channel "
                     "(set --config.quant.granularity=layer).")
  numel = units.unit_numels(layers)
  allocs = landscape.maximal(numel, budget, choices)
  score = ((lambda b: (score_val(b), score_test(b))) if not qat_steps else
           qat_scorer(config, workdir, data, fvars, qat_steps, penalties))
  results, t0 = [], time.time()
  for i, a in enumerate(allocs):
    results.append(score(a))
    if launch.is_primary() and (qat_steps or (i + 1) % 50 == 0 or i + 1 == len(allocs)):
      print(f"[exhaustive] {i + 1}/{len(allocs)} allocations scored ({time.time() - t0:.0f} s)",
            flush=True)
  val, test = (np.stack(x) for x in zip(*results))
  named = {f"uniform{int(np.floor(budget))}": np.full(len(layers), int(np.floor(budget)))}
  named.update(known_allocations(config, workdir, layers, budget,
                                 data["test"].num_classes))
  order = np.argsort(-val[:, 1], kind="stable")

  def row(bits, v, t):
    return dict(bits=[int(b) for b in bits], avg_bits=float((numel * bits).sum() / numel.sum()),
                val_accuracy=float(v[0]), val_worst_group_accuracy=float(v[1]),
                val_worst_group_loss=float(v[2]), test_accuracy=float(t[0]),
                test_worst_group_accuracy=float(t[1]))

  placed = {}
  for name, bits in named.items():
    v, t = score(bits)
    placed[name] = dict(row(bits, v, t), **landscape.rank_of(val[:, 1], float(v[1])))
  return dict(budget=budget, choices=list(choices), qat_steps=qat_steps, penalties=penalties,
              units=units.unit_names(layers),
              numel=numel.tolist(), count=len(allocs),
              val_worst_group_quantiles=np.quantile(val[:, 1], [0, .25, .5, .75, 1]).tolist(),
              test_worst_group_quantiles=np.quantile(test[:, 1], [0, .25, .5, .75, 1]).tolist(),
              best=[row(allocs[i], val[i], test[i]) for i in order[:top]], placed=placed,
              all=[row(allocs[i], val[i], test[i]) for i in order],
              test_worst_group_of_best_val=float(test[order[0], 1]),
              corr_val_test_worst=float(np.corrcoef(val[:, 1], test[:, 1])[0, 1]))


def format_survey(s: dict) -> str:
  """The survey as lines of text."""
  q = ", ".join(f"{100 * x:.2f}" for x in s["val_worst_group_quantiles"])
  lines = [f"{s['count']} allocations at {s['budget']:g} bits over {s['units']}",
           f"validation worst-group accuracy, min/q25/median/q75/max: {q}",
           f"val-test correlation of worst-group accuracy: {s['corr_val_test_worst']:.3f}",
           "best by validation worst-group accuracy (val worst, test worst, test acc):"]
  for r in s["best"]:
    lines.append(f"  {r['bits']} ({r['avg_bits']:.2f} b)  {100 * r['val_worst_group_accuracy']:.2f}"
                 f"  {100 * r['test_worst_group_accuracy']:.2f}  {100 * r['test_accuracy']:.2f}")
  lines.append("placed (val worst, rank among allocations, test worst):")
  for name, r in s["placed"].items():
    lines.append(f"  {name:<18} {r['bits']} {100 * r['val_worst_group_accuracy']:.2f} "
                 f"rank {r['rank']}/{r['of']}  test {100 * r['test_worst_group_accuracy']:.2f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  _, workdir = launch.start(argv)
  f = flags.FLAGS
  s = survey(workdir, f.budget, [int(c) for c in f.choices] if f.choices else None,
             qat_steps=f.qat_steps, penalties=f.penalties, config=f.config)
  if not launch.is_primary():
    return
  print(format_survey(s))
  tag = f"_qat{f.qat_steps}{'_penalty' if f.penalties else ''}" if f.qat_steps else ""
  path = wd.path(workdir, f"landscape_b{s['budget']:g}{tag}.json")
  wd.write_json(path, s)
  print(f"landscape: {path}")


if __name__ == "__main__":
  launch.define_flags(None, config_help="Config; default: WORKDIR/config.json.",
                      workdir_help="A train.py workdir (its float model is surveyed).")
  flags.DEFINE_float("budget", None, "Average-bit budget; default: the config's target_bits.")
  flags.DEFINE_list("choices", None, "Candidate bit-widths; default: importance.choices.")
  flags.DEFINE_integer("qat_steps", 0, "Fine-tune each allocation this many steps first "
                       "(0: round-to-nearest of the float model).")
  flags.DEFINE_bool("penalties", False, "Fine-tune with the config's penalties.")
  app.run(main)
