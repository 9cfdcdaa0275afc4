"""The real trainer on a tiny config: resume, non-finite stop, refusals, budget."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from baq.allocation import projection
from baq.data import pipeline
from baq.quant import units
from baq.experiment import job as experiment, checks as validate
from baq.train import modes, loop as trainer
from baq.train.checkpoint import restore_params
from baq.train.modes import get_mode

STATE_KEYS = {"step", "data_position", "params", "batch_stats", "opt_state", "penalty_state",
              "rng"}


class Preempted(Exception):
  """Stands for the job being killed in the middle of the loop."""


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _saved_state(workdir):
  """(step, whole train state) of a run's latest checkpoint, read with orbax
  alone (no baq code) as host numpy arrays."""
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              item_handlers=ocp.StandardCheckpointHandler(),
                              options=ocp.CheckpointManagerOptions(create=False))
  step = mgr.latest_step()
  meta = mgr.item_metadata(step)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), getattr(meta, "tree", meta))
  state = mgr.restore(step, args=ocp.args.StandardRestore(target))
  mgr.close()
  return step, state


def _log(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _without_timing(line):
  return {k: v for k, v in line.items() if k != "steps_per_s"}


def test_interrupted_run_resumes_bit_for_bit(tmp_path, make_tiny_config, tiny_data,
                                             monkeypatch, capsys):
  """Killed after its step-3 checkpoint, in the middle of step 6 (before the
  bit-widths are projected at step 6), a BAQ run resumed in the same workdir
  ends with every leaf of its train state equal to an uninterrupted run's."""
  config = make_tiny_config(checkpoint_every=3, log_every=1)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")

  def run(workdir):
    return trainer.train(config, workdir, mode="baq", data=tiny_data, steps=8, lr=1e-3)

  run(a)
  assert "resumed" not in capsys.readouterr().out

  original = pipeline.Batcher.batch

  def preempt(self, step):
    if step == 5:  # steps 0-4 done (1-5 in the logs), checkpoint at 3
      raise Preempted
    return original(self, step)

  monkeypatch.setattr(pipeline.Batcher, "batch", preempt)
  with pytest.raises(Preempted):
    run(b)
  assert "resumed" not in capsys.readouterr().out
  assert [l["step"] for l in _log(b)] == [1, 2, 3, 4, 5]
  assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["3"]

  monkeypatch.setattr(pipeline.Batcher, "batch", original)
  run(b)
  out = capsys.readouterr().out
  # The second call restored step 3 and ran only steps 4-8: five, not eight.
  assert f"[baq] resumed from step 3 in {b}" in out
  assert [l["step"] for l in _log(b)] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
  assert out.count("[baq] step ") == 5 + 1  # five progress lines, one projection line
  # What it logged for steps 4-8 is what the uninterrupted run logged.
  assert [_without_timing(l) for l in _log(b)[5:]] == [_without_timing(l) for l in _log(a)[3:]]

  step_a, full = _saved_state(a)
  step_b, resumed = _saved_state(b)
  assert step_a == step_b == 8 and set(full) == set(resumed) == STATE_KEYS
  assert int(full["step"]) == int(full["data_position"]) == 8
  assert full["penalty_state"] and full["opt_state"]  # BAQ has both
  paths = lambda t: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
  assert paths(full) == paths(resumed)
  for path, x, y in zip(paths(full), _leaves(full), _leaves(resumed)):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=path)
  # The continuous bits searched before the projection are the same too.
  with open(os.path.join(a, "searched_bits.json")) as fa, \
      open(os.path.join(b, "searched_bits.json")) as fb:
    assert json.load(fa) == json.load(fb)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_config, tiny_data,
                                                              monkeypatch):
  original = pipeline.Batcher.batch

  def poisoned(self, step):
    b = original(self, step)
    if step >= 5:
      b["image"] = b["image"] * np.nan
    return b

  monkeypatch.setattr(pipeline.Batcher, "batch", poisoned)
  # The float run's own steps and learning rate: its compiled step is reused.
  with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 4\\)"):
    trainer.train(tiny_config, str(tmp_path), mode="float", data=tiny_data,
                  steps=tiny_config.float_steps, lr=tiny_config.optim.lr, use_penalties=False)
  params = restore_params(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in _leaves(params))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  assert max(l["step"] for l in _log(str(tmp_path))) == 4  # nothing logged past it


def test_incompatible_checkpoint_is_refused_and_left_alone(tmp_path, make_tiny_config,
                                                           tiny_data, tiny_float_run):
  workdir = str(tmp_path / "fp32")
  shutil.copytree(tiny_float_run, workdir)
  before = {f: open(os.path.join(workdir, f), "rb").read()
            for f in ("state_signature.json", "metrics.jsonl")}
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  other = make_tiny_config(**{"model.kwargs.widths": (4, 16)})
  with pytest.raises(ValueError, match="incompatible run"):
    trainer.train(other, workdir, mode="float", data=tiny_data, steps=4, lr=1e-3)
  for f, content in before.items():
    assert open(os.path.join(workdir, f), "rb").read() == content, f
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints


@pytest.mark.parametrize("override,match", [
    ({"mode": "bq"}, "Unknown mode 'bq'. Valid mode names: baq, fair_static, fair_static_qat, float, qat"),
    ({"model.name": "resnet"}, "Valid model names: deit_tiny, resnet18, resnet20_cifar, resnet32_cifar, resnet50, resnet56_cifar, resnet8_cifar, small_cnn, tinyvit_5m"),
    ({"dataset.name": "isic"}, "Valid dataset names: .*synthetic_derm"),
    ({"quant.target_bits": 1.5}, "below min_bits=2"),
    ({"quant.target_bits": 9.0}, "above max_bits=8"),
    ({"baselines": "uniform8,int4"}, "Unknown baseline 'int4'"),
    ({"quant.rounding": "floor"}, "Unknown quant.rounding 'floor'. Valid: nearest, measured"),
    ({"quant.rounding_loss": "max"}, "Valid: worst_group, mean"),
    ({"quant.rounding": "measured", "quant.granularity": "channel"}, "needs quant.granularity='layer'"),
    ({"quant.scale_method": "minmax"}, "absmax, percentile, learned, mse"),
])
def test_bad_config_is_refused_before_training(tmp_path, make_tiny_config, override, match):
  config = make_tiny_config(**override)
  with pytest.raises((KeyError, ValueError), match=match):
    experiment.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "fp32")


def test_unknown_penalty_is_refused(tmp_path, tiny_config):
  tiny_config.penalties.worst = dict(weight=1.0)
  with pytest.raises(KeyError, match="Valid regularizer names: bitrate, cvar"):
    experiment.run(tiny_config, str(tmp_path))
  assert not os.path.exists(tmp_path / "fp32")


def _adam_step_bound(t, b1=0.9, b2=0.999):
  """max |m_hat_t| / sqrt(v_hat_t) of Adam at step t over all gradient
  sequences: by Cauchy-Schwarz, sqrt(sum_i a_i^2 / c_i) with a_i, c_i the
  bias-corrected EMA weights of g_i in m_hat and of g_i^2 in v_hat."""
  i = np.arange(1, t + 1)
  a = (1 - b1) * b1 ** (t - i) / (1 - b1**t)
  c = (1 - b2) * b2 ** (t - i) / (1 - b2**t)
  return float(np.sqrt(np.sum(a**2 / c)))


def test_baq_ends_at_a_frozen_integer_allocation_within_budget(tmp_path, make_tiny_config,
                                                              tiny_data, capsys):
  target, steps = 3.5, 8
  config = make_tiny_config(**{"quant.target_bits": target})
  lo, hi = config.quant.min_bits, config.quant.max_bits
  final_at = trainer.finalize_step(config, get_mode(config, "baq"), steps)
  assert final_at == 6
  run = trainer.train(config, str(tmp_path), mode="baq", data=tiny_data, steps=steps, lr=1e-3)
  assert "step     6 bit-widths projected to integers" in capsys.readouterr().out
  layers = units.find_units(run.params)
  bits, numel = np.asarray(units.gather_bits(run.params, layers)), units.unit_numels(layers)
  np.testing.assert_array_equal(bits, np.round(bits))
  assert bits.min() >= lo and bits.max() <= hi
  # The budget holds after rounding, exactly: an integer number of weight
  # bits against 3.5 * (weight count), which is an integer or a half.
  used, total = int((bits * numel).sum()), int(numel.sum())
  assert used <= target * total
  # And it is spent (projection.nearest(spend=True)): what is left is less than
  # any unit below max_bits would cost for one more bit.
  assert np.all(numel[bits < hi] > target * total - used), (target * total - used, numel)
  # The searched continuous bits are kept beside the checkpoints for export,
  # and the deployed allocation is their projection.
  searched = trainer.searched_params(str(tmp_path), run.params, layers)
  cont = np.asarray(units.gather_bits(searched, layers), np.float64)
  assert not np.array_equal(cont, np.round(cont))
  np.testing.assert_array_equal(bits, projection.nearest(cont, numel, target, lo, hi,
                                                             spend=True))
  # They started at the budget and moved by Adam steps of bits_lr only
  # (clipping to [min_bits, max_bits] never moves them away from it).
  drift = config.optim.bits_lr * sum(_adam_step_bound(t) for t in range(1, final_at + 1))
  assert np.all(np.abs(cont - target) <= drift), (np.abs(cont - target).max(), drift)
  # Uniform QAT never trains bits, so it never projects.
  assert trainer.finalize_step(config, get_mode(config, "qat", 4), steps) == float("inf")


def test_search_steps_then_a_fresh_finetune_at_the_integer_bits(tmp_path, make_tiny_config,
                                                                 tiny_data, capsys):
  """quant.search_steps: search S steps, project, then `steps` steps from a fresh optimizer."""
  config = make_tiny_config(**{"quant.search_steps": 4})
  spec = get_mode(config, "baq")
  total = modes.run_steps(config, spec)
  assert total == 4 + config.steps and modes.run_steps(config, get_mode(config, "qat", 4)) == \
      config.steps
  assert trainer.finalize_step(config, spec, total) == 4
  trainer.train(config, str(tmp_path), mode="baq", data=tiny_data, steps=total, lr=1e-3)
  assert "step     4 bit-widths projected to integers" in capsys.readouterr().out
  state = ocp.StandardCheckpointer().restore(
      os.path.join(tmp_path, "checkpoints", str(total), "default"))
  assert int(state["step"]) == total
  # Every optimizer counter restarted at the projection: the fine-tune's
  # schedule and Adam moments span its own `steps` steps, as fair_static_qat's do.
  counts = [int(v) for p, v in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
            if "count" in jax.tree_util.keystr(p)]
  assert counts and set(counts) == {config.steps}, counts


def test_measured_rounding_deploys_the_knapsack_of_the_measured_losses(tmp_path, make_tiny_config,
                                                                     tiny_data, capsys):
  """quant.rounding='measured': the finalize step's integers are `projection.measured`'s,
  for the deployed model's worst-group calibration loss, and spend the budget."""
  from baq.allocation import statistics  # pylint: disable=import-outside-toplevel
  from baq.data.pipeline import normalize  # pylint: disable=import-outside-toplevel
  from baq.fairness import losses  # pylint: disable=import-outside-toplevel
  from baq.train import rounding, state as train_state  # pylint: disable=import-outside-toplevel
  from baq.variables import apply_model  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(**{"quant.search_steps": 4, "quant.rounding": "measured",
                               "quant.scale_method": "mse"})
  split = tiny_data["train"]
  setup = train_state.create_train_state(
      config, "baq", num_classes=split.num_classes, num_groups=split.num_groups,
      image_shape=split.images.shape[1:], steps=6, lr=1e-3)
  params = units.scatter_bits(setup.state["params"], setup.layers,
                              np.linspace(2.6, 6.3, len(setup.layers)))
  stats = setup.state["batch_stats"]
  out = rounding.integer_params(config, setup, params, stats, split)
  ints = np.asarray(units.gather_bits(out, setup.layers))
  calib = statistics.calibration_split(split, config.importance.calib_per_group, config.seed)

  forward = jax.jit(lambda b: losses.cross_entropy(apply_model(
      setup.eval_model, dict(params=units.scatter_bits(params, setup.layers, b),
                             batch_stats=stats), normalize(calib.images)), calib.labels))

  def worst(b):  # the rounding loss, computed directly
    per_ex = np.asarray(forward(jnp.asarray(b, jnp.float32)))
    return max(per_ex[calib.groups == g].mean() for g in np.unique(calib.groups))

  numel = units.unit_numels(setup.layers)
  want = projection.measured(worst, np.asarray(units.gather_bits(params, setup.layers)), numel,
                             setup.budget, config.quant.min_bits, config.quant.max_bits)
  np.testing.assert_array_equal(ints, want)
  assert (numel * ints).sum() <= setup.budget * numel.sum()
  cap = np.floor(setup.budget * numel.sum() + 1e-9)
  assert all(b == config.quant.max_bits or (numel * ints).sum() + n > cap
             for b, n in zip(ints, numel))
  # And the trainer uses it at the finalize step.
  total = modes.run_steps(config, get_mode(config, "baq"))
  trainer.train(config, str(tmp_path), mode="baq", data=tiny_data, steps=total, lr=1e-3)
  assert "bit-widths projected to integers" in capsys.readouterr().out


def test_search_steps_must_be_positive(make_tiny_config):
  config = make_tiny_config(**{"quant.search_steps": 0})
  with pytest.raises(ValueError, match="quant.search_steps=0 must be None or a positive"):
    validate.validate(config)


def test_uniform16_keeps_its_16_bits(tmp_path, tiny_config, tiny_data):
  """QAT's bit-widths do not train, so nothing clips them to [min_bits, max_bits]."""
  run = trainer.train(tiny_config, str(tmp_path), mode="qat", bits=16, data=tiny_data, steps=2,
                      lr=1e-3)
  bits = np.asarray(units.gather_bits(run.params, units.find_units(run.params)))
  assert bits.size and np.all(bits == 16.0), bits


def _events(directory):
  """Every Event in a directory's TensorBoard files, read as TFRecords here
  (length, its CRC, the record, its CRC) with tensorboardX's Event proto."""
  import glob  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      n, = struct.unpack("<Q", data[pos:pos + 8])
      out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return out


def test_tensorboard_events_hold_the_logged_scalars_groups_and_bit_histogram(
    tmp_path, make_tiny_config, tiny_data):
  config = make_tiny_config(tensorboard=True)
  trainer.train(config, str(tmp_path), mode="baq", data=tiny_data, steps=8, lr=1e-3)
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  scalars, hists = {}, {}
  for e in _events(os.path.join(tmp_path, "tensorboard")):
    for v in e.summary.value:
      if v.HasField("histo"):
        hists[(v.tag, e.step)] = v.histo
      else:
        scalars[(v.tag, e.step)] = v.simple_value
  for line in lines:  # every scalar of metrics.jsonl, at its step
    for k, x in line.items():
      if k != "step" and isinstance(x, float):
        assert scalars[(k, line["step"])] == pytest.approx(x, rel=1e-6), k
    names = tiny_data["train"].group_names
    for g, acc in enumerate(line["train_group_acc"]):
      if acc is not None:
        assert scalars[(f"train_group_acc/{names[g]}", line["step"])] == pytest.approx(acc)
  assert "val_group_acc" in lines[-1] and len(lines[-1]["val_group_acc"]) == len(names)
  # The histogram counts every unit once, within the bit range.
  bits = hists[("bits", lines[-1]["step"])]
  n_units = len(units.gather_bits(restore_params(str(tmp_path)),
                                  units.find_units(restore_params(str(tmp_path)))))
  assert bits.num == n_units
  assert config.quant.min_bits <= bits.min <= bits.max <= config.quant.max_bits
