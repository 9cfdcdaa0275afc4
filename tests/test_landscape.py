"""The brute-force landscape of integer allocations, against a recursive enumeration."""

import numpy as np
import pytest

from baq.allocation import landscape


def _recursive(numel, cap, choices):
  """Every allocation (by recursion) that fits `cap` budget bits and admits no step up."""
  out = []

  def go(prefix):
    if len(prefix) == len(numel):
      spent = sum(n * b for n, b in zip(numel, prefix))
      if spent > cap:
        return
      for u, b in enumerate(prefix):
        i = choices.index(b)
        if i + 1 < len(choices) and spent + numel[u] * (choices[i + 1] - b) <= cap:
          return
      out.append(tuple(prefix))
      return
    for b in choices:
      go(prefix + [b])

  go([])
  return sorted(out)


@pytest.mark.parametrize("seed", range(6))
def test_maximal_allocations_are_exactly_the_budget_filling_ones(seed):
  rng = np.random.default_rng(seed)
  numel = rng.integers(1, 60, rng.integers(2, 5)).tolist()
  choices = sorted(rng.choice(np.arange(2, 9), rng.integers(2, 5), replace=False).tolist())
  target = float(rng.uniform(choices[0], choices[-1]))
  cap = int(np.floor(target * sum(numel) + 1e-9))
  want = _recursive(numel, cap, choices)
  if not want:
    with pytest.raises(ValueError, match="No allocation"):
      landscape.maximal(numel, target, choices)
    return
  got = sorted(map(tuple, landscape.maximal(numel, target, choices).tolist()))
  assert got == want


def test_maximal_refuses_too_many_allocations():
  with pytest.raises(ValueError, match="allocations, over"):
    landscape.maximal([10] * 12, 4.0, range(2, 9))


def test_rank_of_places_a_value_among_scores():
  r = landscape.rank_of(np.array([0.1, 0.5, 0.3, 0.9]), 0.5)
  assert r == dict(better_than=0.5, rank=2, of=4)


def test_survey_scores_every_allocation_as_the_deployed_model_evaluates(tmp_path,
                                                                         make_tiny_config,
                                                                         tiny_float_run):
  """The landscape's round-to-nearest scores are evaluate_split's on the deployed model."""
  from baq.models import build_model  # pylint: disable=import-outside-toplevel
  from baq.quant import units  # pylint: disable=import-outside-toplevel
  from baq.quant.inject import QuantMode  # pylint: disable=import-outside-toplevel
  from baq.experiment import job as experiment, exhaustive as train_landscape  # pylint: disable=import-outside-toplevel
  from baq import workdir as wd  # pylint: disable=import-outside-toplevel
  from baq.train.checkpoint import restore_variables  # pylint: disable=import-outside-toplevel
  from baq.train.evaluate import evaluate_split  # pylint: disable=import-outside-toplevel
  from baq.train.modes import get_mode  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(init_checkpoint=tiny_float_run, mode="fair_static",
                            **{"quant.target_bits": 3.0})
  with open(tmp_path / wd.CONFIG_FILE, "w") as f:
    f.write(config.to_json())
  s = train_landscape.survey(str(tmp_path), choices=(2, 3, 4, 8), top=3)
  numel = np.asarray(s["numel"])
  assert s["count"] == len(landscape.maximal(numel, 3.0, (2, 3, 4, 8)))
  assert len(s["best"]) == 3 and s["placed"]["uniform3"]["bits"] == [3] * len(numel)
  vals = [r["val_worst_group_accuracy"] for r in s["best"]]
  assert vals == sorted(vals, reverse=True)
  # One allocation, evaluated the ordinary way: the deployed model at those bits.
  data = experiment.load_data(config)
  fvars = restore_variables(tiny_float_run)
  model = build_model(config.model.name, data["test"].num_classes,
                      get_mode(config, "qat", 8).quantizer.replace(mode=QuantMode.EVAL),
                      **config.model.kwargs.to_dict())
  params = experiment.init_quantized(model, data["test"], fvars["params"])
  layers = units.find_units(params)
  best = s["best"][0]
  m = evaluate_split(model, dict(fvars, params=units.scatter_bits(params, layers, best["bits"])),
                     data["test"], config.eval_batch_size)
  assert best["test_accuracy"] == pytest.approx(m["accuracy"])
  assert best["test_worst_group_accuracy"] == pytest.approx(m["worst_group_accuracy"])
  assert "uniform3" in train_landscape.format_survey(s)


@pytest.mark.parametrize("seed", range(4))
def test_random_maximal_draws_only_and_eventually_every_budget_filling_allocation(seed):
  rng = np.random.default_rng(100 + seed)
  numel = rng.integers(1, 40, 3).tolist()
  choices = [2, 3, 4, 6]
  target = float(rng.uniform(2.2, 5.5))
  want = set(_recursive(numel, int(np.floor(target * sum(numel) + 1e-9)), choices))
  draws = {tuple(landscape.random_maximal(numel, target, choices, rng).tolist())
           for _ in range(400)}
  assert draws <= want  # each draw meets the budget and wastes none of it
  assert len(draws) >= min(len(want), 2)  # it is random, not one fixed allocation
  for b in want:
    assert landscape.is_maximal(np.array(b), numel, target, choices)


def test_random_maximal_scales_to_many_units_and_is_maximal():
  rng = np.random.default_rng(0)
  numel = rng.integers(10, 500, 179)
  bits = landscape.random_maximal(numel, 2.5, (2, 3, 4, 5, 6, 8), rng)
  assert (numel * bits).sum() <= 2.5 * numel.sum()
  assert landscape.is_maximal(bits, numel, 2.5, (2, 3, 4, 5, 6, 8))
  assert not landscape.is_maximal(np.full(179, 2), numel, 2.5, (2, 3, 4, 5, 6, 8))
  with pytest.raises(ValueError, match="No allocation"):
    landscape.random_maximal(numel, 1.5, (2, 3), rng)


def test_fill_budget_only_raises_and_ends_maximal_taking_the_best_gain_first():
  rng = np.random.default_rng(3)
  numel, choices = [10, 10, 20], (2, 3, 4)
  start = np.array([2, 2, 2])
  gain = rng.uniform(size=(3, 3))
  out = landscape.fill_budget(start, numel, 3.0, choices, gain)
  assert np.all(out >= start) and landscape.is_maximal(out, numel, 3.0, choices)
  # One step of budget left (10 weight-bits): the unit of the larger gain per bit takes it.
  best = int(np.argmax([gain[0, 0] / 10, gain[1, 0] / 10]))
  out = landscape.fill_budget(start, numel, 2.25, choices, gain)
  assert out.tolist() == [3 if best == 0 else 2, 3 if best == 1 else 2, 2]
