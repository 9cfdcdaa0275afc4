"""The allocation protocol on the tiny config: equal steps, selection on validation, resume,
and its report's paired tests and Holm adjustment on planted numbers."""

import os

import numpy as np
import pytest

from baq import workdir as wd
from baq.experiment import protocol, protocol_report
from baq.stats import corrections
from configs import protocol as protocol_config

# minimax is static's path with another solver: left out here.
ARMS = "uniform,static,measured,probed,baq,bilevel,random,oracle"


@pytest.fixture(scope="module")
def finished(make_tiny_config, tiny_data, tmp_path_factory):
  """One seed of every arm at one budget, trained once for this file."""
  c = make_tiny_config(**{"quant.search_steps": 3, "importance.choices": (2, 3, 4)})
  c.protocol = protocol_config.get_config("layer,runlocal").protocol
  c.protocol.budgets, c.protocol.arms, c.protocol.random_count = (3.0,), ARMS, 2
  c.protocol.probe_steps, c.protocol.probe_per_group = 2, 8
  c.concurrent_runs = "1"
  root = str(tmp_path_factory.mktemp("protocol"))
  runs = {0: protocol.run_seed(c, root, 0, tiny_data, log=lambda *_: None)}
  return c, root, runs


def test_every_arm_trains_the_same_total_steps_within_the_budget(finished):
  c, root, runs = finished
  T = c.steps + 3
  assert protocol.total_steps(c) == T
  for s, rows in runs.items():
    assert sorted(rows) == sorted(["uniform3", "uniform8", "static@3", "measured@3", "probed@3",
                                   "baq@3", "bilevel@3", "random@3", "oracle@3"])
    assert wd.latest_step(wd.path(wd.seed_dir(root, s), "uniform3")) == T
    for name, r in rows.items():
      if name.startswith("uniform"):
        continue
      assert r["avg_bits"] <= 3.0 + 1e-9 and r["steps"] == T
      # A search's steps count in the total: the bi-level run trains what is left.
      left = T - r["search_steps"] if r["arm"] == "bilevel" else T
      for cand in r["candidates"]:
        assert wd.latest_step(wd.path(root, cand["run"])) == left
    assert rows["baq@3"]["search_steps"] == 3 and rows["static@3"]["search_steps"] == 0
    assert rows["bilevel@3"]["search_steps"] == 3
    assert os.path.exists(wd.path(wd.arm_dir(root, s, 3.0, "bilevel"), "bilevel_search.msgpack"))
    assert rows["measured@3"]["info"]["calibration"] == "validation"
    probed = rows["probed@3"]
    assert probed["info"]["measure"] == "probed" and probed["search_seconds"] > 0


def test_the_kept_candidate_is_the_best_on_validation_and_the_test_file_matches(finished):
  _, root, runs = finished
  for s, rows in runs.items():
    for arm in ("random@3", "oracle@3"):
      r = rows[arm]
      val = [(x["validation"]["worst_group_accuracy"], x["validation"]["accuracy"])
             for x in r["candidates"]]
      assert r["selected"] == r["candidates"][int(np.argmax([v[0] * 10 + v[1] for v in val]))][
          "candidate"] or val.count(max(val)) > 1
      assert len(r["candidates"]) == (2 if arm == "random@3" else r["info"]["allocations"])
    correct = np.load(wd.path(wd.arm_dir(root, s, 3.0, "static"), wd.ARM_CORRECT_FILE))
    assert correct.mean() == pytest.approx(rows["static@3"]["test"]["accuracy"])


def test_an_allocation_two_arms_ask_for_is_trained_once_and_equals_training_it_again(
    finished, tiny_data, tmp_path):
  c, root, runs = finished
  by_bits = {}
  for name, r in runs[0].items():
    if name.startswith("uniform") or r["arm"] in ("baq", "bilevel"):
      continue
    for cand in r["candidates"]:
      by_bits.setdefault(tuple(cand["bits"]), set()).add(cand["run"])
  assert all(len(v) == 1 for v in by_bits.values()), by_bits
  shared = [x for x in runs[0]["oracle@3"]["candidates"] if not x["run"].endswith(
      "oracle/" + x["candidate"])]
  assert shared, "the oracle enumerates every allocation, so it meets static's"
  # The premise: the same allocation trained again, elsewhere, gives the same model.
  from baq.train.checkpoint import restore_variables
  import jax
  cb = c.copy_and_resolve_references()
  cb.seed, cb.quant.target_bits = 0, 3.0
  run = shared[0]["run"]
  float_vars = restore_variables(wd.path(wd.seed_dir(root, 0), wd.FLOAT))
  protocol._train_run(cb, str(tmp_path / "again"), "fair_static_qat", tiny_data, float_vars,
                      protocol.total_steps(cb), {}, bits=np.asarray(shared[0]["bits"]))
  a, b = restore_variables(wd.path(root, run)), restore_variables(str(tmp_path / "again"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_another_regime_copies_the_float_model_and_a_different_one_is_refused(
    finished, tmp_path):
  c, root, _ = finished
  with open(os.path.join(root, wd.CONFIG_FILE), "w") as f:
    f.write(c.to_json())
  other = c.copy_and_resolve_references()
  other.quant.granularity = "channel"  # another regime, the same float model
  other.protocol.float_from = root
  fp_dir = str(tmp_path / "fp32")
  protocol._float_from(other, str(tmp_path), 0, fp_dir)
  src = wd.path(wd.seed_dir(root, 0), wd.FLOAT)
  assert wd.latest_step(fp_dir) == wd.latest_step(src) == c.float_steps
  assert sorted(os.listdir(wd.path(fp_dir, "checkpoints"))) == sorted(
      os.listdir(wd.path(src, "checkpoints")))
  other.float_steps = c.float_steps + 1
  with pytest.raises(ValueError, match="other float_steps"):
    protocol._float_from(other, str(tmp_path), 0, str(tmp_path / "fp32b"))
  assert not os.path.exists(tmp_path / "fp32b")
  said = []  # a seed the other workdir has not trained is trained here
  other.float_steps = c.float_steps
  protocol._float_from(other, str(tmp_path), 7, str(tmp_path / "fp32c"), said.append)
  assert not os.path.exists(tmp_path / "fp32c") and "training it here" in said[0]


def test_a_rerun_reads_every_finished_arm_back(finished, tiny_data):
  c, root, runs = finished
  again = protocol.run_seed(c, root, 0, tiny_data, log=lambda *_: None)
  assert again == runs[0]


def test_the_summary_pairs_every_arm_with_the_static_control(finished, tiny_data):
  c, root, runs = finished
  runs = {0: runs[0], 1: runs[0]}  # a second seed's table, for the pairing's shape
  summary = protocol_report.summarize(c, root, runs, tiny_data["test"])
  comparisons = summary["budgets"]["3"]["comparisons"]
  assert {x["row"] for x in comparisons if x["against"] == "static@3"} == {
      "measured@3", "probed@3", "baq@3", "bilevel@3", "random@3", "oracle@3"}
  for x in comparisons:
    assert x["holm_p"] >= x["t_p"] or np.isnan(x["t_p"])
  text = protocol_report.format_summary(summary)
  assert "static@3" in text and "Holm family" in text
  by = {(x["row"], x["against"]): x for x in comparisons}
  want = int(np.sum(np.asarray(runs[0]["measured@3"]["bits"])
                    != np.asarray(runs[0]["static@3"]["bits"])))
  assert by[("measured@3", "static@3")]["units_differ"] == [want, want]
  assert by[("measured@3", "uniform3")]["units_differ"] is None  # uniform has no allocation


def _planted(seeds, gain):
  """Runs where arm "good" beats static and uniform by `gain` worst-group points."""
  runs = {}
  for s in seeds:
    noise = 0.002 * s
    row = lambda w, a=0.8: dict(test=dict(worst_group_accuracy=w, accuracy=a,
                                          group_accuracy=[w, a]),
                                validation=dict(worst_group_accuracy=w, accuracy=a),
                                avg_bits=2.5, search_seconds=1.0, train_seconds=2.0)
    runs[s] = {"uniform2": row(0.5), "uniform3": row(0.6 + noise), "uniform8": row(0.7),
               "static@2.5": row(0.6 + noise), "good@2.5": row(0.6 + gain + 2 * noise),
               "same@2.5": row(0.6 + (noise if s % 2 else -noise))}
  return runs


class _Test:
  groups = np.array([0] * 300 + [1] * 700)
  labels = np.zeros(1000)
  num_groups = 2
  group_names = ("a", "b")


def test_a_planted_win_passes_holm_and_a_null_arm_does_not():
  c = protocol_config.get_config("layer,runlocal")
  c.protocol.budgets = (2.5,)
  summary = protocol_report.summarize(c, "/nonexistent", _planted(range(5), 0.05), _Test())
  comps = {(x["row"], x["against"]): x for x in summary["budgets"]["2.5"]["comparisons"]}
  assert comps[("good@2.5", "static@2.5")]["holm_p"] < 0.05
  assert comps[("same@2.5", "static@2.5")]["holm_p"] > 0.5
  raw = [1.0 if np.isnan(x["t_p"]) else x["t_p"]  # no difference at all: no evidence
         for x in summary["budgets"]["2.5"]["comparisons"]]
  adjusted = [x["holm_p"] for x in summary["budgets"]["2.5"]["comparisons"]]
  np.testing.assert_allclose(adjusted, corrections.holm(np.array(raw)))
  assert summary["goal"] == ["good@2.5"]
  # Accuracy more than a point below uniform 8-bit disqualifies the same win.
  runs = _planted(range(5), 0.05)
  for s in runs:
    runs[s]["uniform8"]["test"]["accuracy"] = 0.9
  assert protocol_report.summarize(c, "/x", runs, _Test())["goal"] == []


def test_the_wilcoxon_family_survives_one_collapsed_baseline_run_where_the_t_test_does_not():
  c = protocol_config.get_config("layer,runlocal")
  c.protocol.budgets = (2.5,)
  runs = _planted(range(10), 0.01)
  for s in runs:  # a small, steady lead over both; uniform3 collapses on one seed
    runs[s]["good@2.5"]["test"]["worst_group_accuracy"] += 0.001 * (s % 3)
  runs[9]["uniform3"]["test"]["worst_group_accuracy"] = 0.3
  by = {}
  for test in ("t", "wilcoxon"):
    c.protocol.test = test
    summary = protocol_report.summarize(c, "/x", runs, _Test())
    by[test] = {(x["row"], x["against"]): x for x in summary["budgets"]["2.5"]["comparisons"]}
    assert summary["test"] == test
  up = ("good@2.5", "uniform3")
  assert by["t"][up]["holm_p"] > 0.05 and by["wilcoxon"][up]["holm_p"] < 0.05
  raw = [x["wilcoxon_p"] for x in by["wilcoxon"].values()]
  np.testing.assert_allclose([x["holm_p"] for x in by["wilcoxon"].values()],
                             corrections.holm(np.array(raw)))
  assert "exact Wilcoxon p-values" in protocol_report.format_summary(summary)
  c.protocol.test = "mann_whitney"
  with pytest.raises(ValueError, match="protocol.test='mann_whitney'.*Valid: t, wilcoxon"):
    protocol.check(c)


def test_regimes_and_bad_arms_are_refused_with_the_valid_names():
  with pytest.raises(ValueError, match="Valid: layer, layer_a4, channel"):
    protocol_config.get_config("per_tensor")
  c = protocol_config.get_config("channel_a4")
  assert c.quant.granularity == "channel" and c.quant.act_bits == 4
  assert c.dataset.kwargs.num_test == 80_000 and len(c.seeds) == 5
  c.protocol.arms = "static,hessian_magic"
  with pytest.raises(KeyError, match="hessian_magic.*static"):
    protocol.arm_names(c)
  assert protocol.uniform_bits([2.5, 3.0]) == [2, 3, 8]
  c = protocol_config.get_config("layer")
  protocol.check(c)
  c.protocol.probe_steps = -1
  with pytest.raises(ValueError, match="protocol.probe_steps=-1 must be an integer >= 0"):
    protocol.check(c)
  c.protocol.probe_steps, c.protocol.reference = 20, "probe"
  with pytest.raises(ValueError, match="reference='probe' is not one of the arms"):
    protocol.check(c)
  assert os.path.basename(wd.arm_dir("/r", 1, 2.5, "static")) == "static"


def test_the_detectable_difference_is_what_a_t_test_finds_80_percent_of_the_time():
  from scipy import stats as sps
  rng = np.random.default_rng(0)
  sd, n = 0.02, 5
  spread = np.array([-1, -.5, 0, .5, 1])
  d = protocol_report.detectable(spread * sd / spread.std(ddof=1))  # n seeds of sd `sd`
  # Simulated: a true mean of `d` with this sd is found (p < 0.05) about 80 % of the time.
  hits = np.mean([sps.ttest_1samp(rng.normal(d, sd, n), 0).pvalue < 0.05 for _ in range(4000)])
  assert 0.74 < hits < 0.86
  assert np.isnan(protocol_report.detectable([0.1]))


def test_read_seed_gives_the_finished_rows_without_training(finished):
  c, root, runs = finished
  assert protocol.read_seed(c, root, 0) == runs[0]
  assert protocol.read_seed(c, root, 7) == {}


def test_a_seeds_analysis_is_saved_once_and_read_back_by_every_budget(finished, tiny_data):
  """The fixture's run saved the static plan's analysis in the seed's directory. A
  Context at another budget reads it (no analysis computed: a poisoned float model
  would change it), plans as from a fresh analysis, and so does a rerun; what the
  analysis depends on changes its file, the budget and the solver do not."""
  import jax
  from baq.experiment import arms, job
  from baq.quant import units
  from baq.train.checkpoint import restore_variables
  c, root, _ = finished
  sdir = wd.seed_dir(root, 0)
  saved = [f for f in os.listdir(sdir) if f.startswith("analysis_train_")]
  assert len(saved) == 1
  cb = c.copy_and_resolve_references()
  cb.seed, cb.quant.target_bits = 0, 2.5
  fv = restore_variables(wd.path(sdir, wd.FLOAT))
  numel = units.unit_numels(job.plan_units(cb, fv, tiny_data["train"])[0])
  poisoned = jax.tree.map(lambda x: x * 0 + 1, fv)  # an analysis of it would differ
  ctx = arms.Context(cb, tiny_data, poisoned, numel, (2, 3, 4), 2.5, analysis_dir=sdir)
  read, _ = ctx.plan()
  fresh, _ = arms.Context(cb, tiny_data, fv, numel, (2, 3, 4), 2.5).plan()
  assert read["bits"] == fresh["bits"] and read["importance"] == fresh["importance"]
  assert read["target_bits"] == 2.5 and saved == [
      f for f in os.listdir(sdir) if f.startswith("analysis_train_")]
  assert arms.Context(cb, tiny_data, poisoned, numel, (2, 3, 4), 2.5).plan()[0][
      "importance"] != fresh["importance"]  # the poison would have shown
  other = cb.copy_and_resolve_references()
  other.quant.target_bits, other.importance.method = 3.0, "minimax"
  assert arms._analysis_key(other, "train") == arms._analysis_key(cb, "train")
  other.importance.num_probes += 1
  assert arms._analysis_key(other, "train") != arms._analysis_key(cb, "train")
  assert arms._analysis_key(cb, "validation") != arms._analysis_key(cb, "train")
