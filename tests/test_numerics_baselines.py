"""The runtimes' numerics (llm_int8, nf4, ...) as post-training baselines of the main job."""

import json
import os
import shutil

import flax.traverse_util as tu
import numpy as np
import pytest

from baq.models import build_model
from baq.quant.inject import QuantMode, Quantizer, QuantSpec
from baq.quant.numerics import NUMERICS
from baq.study import compare
from baq.experiment import job as experiment, runtime_baselines, checks as validate
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import predict_logits

# The tiny SmallCNN (widths (4, 8), hidden 8, 3 classes, 16x16x3 images):
# kernels Conv_0 3*3*3*4 = 108, Conv_1 3*3*4*8 = 288 (float under every
# runtime), Dense_0 8*8 = 64, head 8*3 = 24; biases 4 + 8 + 8 + 3 = 23.
CONV, DENSE, BIASES = 108 + 288, 64 + 24, 23
FLOAT_BYTES = 4 * (CONV + BIASES)  # what stays float32 under a runtime


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_config, tiny_float_run):
  """QAT with uniform 4-bit and two runtime baselines, from the session's float model."""
  workdir = str(tmp_path_factory.mktemp("numerics"))
  config = make_tiny_config(init_checkpoint=tiny_float_run)
  config.mode, config.baselines, config.export = "qat", "uniform4,llm_int8,nf4", "safetensors"
  return config, workdir, experiment.run(config, workdir)


def test_report_has_the_runtime_rows_beside_the_others(run):
  _, workdir, report = run
  on_disk = json.load(open(os.path.join(workdir, "report.json")))
  assert list(on_disk["methods"]) == ["fp32", "uniform4", "uniform4_ptq", "llm_int8", "nf4",
                                      "qat4"]
  for name in ("llm_int8", "nf4"):
    m = on_disk["methods"][name]
    assert len(m["group_accuracy"]) == len(on_disk["group_names"])
    assert min(a for a in m["group_accuracy"] if a is not None) == m["worst_group_accuracy"]
    assert name in on_disk["note"]
    assert not os.path.exists(os.path.join(workdir, name))  # nothing trained, nothing stored


def _hand_nf4(config, float_run, test):
  model = build_model(config.model.name, test.num_classes, Quantizer(
      rules=((".*", QuantSpec(numerics="nf4")),), mode=QuantMode.EVAL),
      **config.model.kwargs.to_dict())
  return model, restore_variables(float_run)


def test_nf4_row_is_the_hand_built_nf4_model(run, tiny_data, tiny_float_run):
  """The row's model predicts, example for example, what QuantSpec(numerics="nf4")
  on the float weights predicts, and its accuracies are those predictions'."""
  config, _, report = run
  test = tiny_data["test"]
  hand, variables = _hand_nf4(config, tiny_float_run, test)
  want = predict_logits(hand, variables, test, config.eval_batch_size)
  got = predict_logits(runtime_baselines.model(config, "nf4", test.num_classes), variables,
                       test, config.eval_batch_size)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # ste=True: forward unchanged
  correct = want.argmax(-1) == test.labels
  row = report["methods"]["nf4"]
  assert row["accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
  for g, a in enumerate(row["group_accuracy"]):
    assert a == pytest.approx(correct[test.groups == g].mean(), abs=1e-12)
  # Not a no-op: the float model's logits differ, and so does each Dense kernel as stored.
  float_logits = predict_logits(build_model(config.model.name, test.num_classes, None,
                                            **config.model.kwargs.to_dict()),
                                variables, test, config.eval_batch_size)
  assert np.abs(float_logits - want).max() > 1e-4
  flat = tu.flatten_dict(variables["params"])
  for layer in ("Dense_0", "head"):
    w = np.asarray(flat[(layer, "kernel")])
    dq = np.asarray(NUMERICS.get("nf4").quantize_weight(w))
    assert np.abs(dq - w).max() > 1e-3
    assert len(np.unique(dq)) <= 16  # one block of 64 (or fewer) weights: 16 codes x absmax
    assert np.abs(dq).max() == pytest.approx(np.abs(w).max(), rel=1e-6)  # absmax is exact


def test_avg_bits_and_size_by_hand(run):
  """avg_bits: Dense codes at the runtime's bits, convolutions at 32, over all
  quantized kernels; size: float32 rest, codes and the runtime's scales."""
  m = run[2]["methods"]
  nf4, i8 = m["nf4"], m["llm_int8"]
  assert nf4["avg_bits"] == pytest.approx((4 * DENSE + 32 * CONV) / (DENSE + CONV))  # 26.909
  # One float32 absmax per 64-block: Dense_0 and head hold one block each.
  assert nf4["size_bytes"] == FLOAT_BYTES + (4 * 64 + 32) / 8 + (4 * 24 + 32) / 8  # 1728
  assert nf4["bits_per_dense_weight"] == pytest.approx((4 * DENSE + 2 * 32) / DENSE)  # 4.727
  assert i8["avg_bits"] == pytest.approx((8 * DENSE + 32 * CONV) / (DENSE + CONV))
  # One float32 absmax per output channel (SCB): 8 for Dense_0, 3 for head.
  assert i8["size_bytes"] == FLOAT_BYTES + (8 * 64 + 32 * 8) / 8 + (8 * 24 + 32 * 3) / 8  # 1808
  assert m["fp32"]["size_bytes"] == 4 * (CONV + DENSE + BIASES)  # 2028


def test_storage_follows_the_options(run, tiny_data, tiny_float_run):
  """blocksize 32 splits Dense_0 into two blocks; double quantization stores 8-bit
  absmaxes, a float32 absmax per 256 of them and a float32 offset."""
  config, _, _ = run
  c = config.copy_and_resolve_references()
  test = tiny_data["test"]
  variables = restore_variables(tiny_float_run)
  sample = np.zeros((1,) + test.images.shape[1:], np.float32)
  def size(**opts):
    c.numerics_options.nf4.update(opts)
    model = runtime_baselines.model(c, "nf4", test.num_classes)
    return runtime_baselines.storage(c, "nf4", model, variables, sample)["size_bytes"]
  assert size(blocksize=32) == FLOAT_BYTES + (4 * 64 + 2 * 32) / 8 + (4 * 24 + 32) / 8
  assert size(blocksize=64, double_quant=True) == FLOAT_BYTES + (4 * 64 + 8 + 32 + 32) / 8 + \
      (4 * 24 + 8 + 32 + 32) / 8
  # QLoRA's figures for blocksize 64: 32/64 = 0.5 bits of absmax per weight,
  # 8/64 + 32/(64*256) = 0.127 with double quantization (Dettmers et al. 2023).
  n = 4096 * 4096
  assert NUMERICS.get("nf4").storage(4096, 4096)[1] / n == 0.5
  assert NUMERICS.get("nf4").storage(4096, 4096, double_quant=True)[1] / n == pytest.approx(
      0.127, abs=5e-4)


def test_reporting_a_copy_prints_the_rows_and_skips_their_export(run, tmp_path, capsys):
  """eval.py's path (report) on the workdir: the printed table has the rows, a
  note says why they are not exported, and an unfinished uniform run is refused."""
  config, workdir, report = run
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  again = experiment.report(config, copy)
  out = capsys.readouterr().out
  rows = {line.split()[0] for line in out.splitlines() if line.strip()}
  assert {"llm_int8", "nf4", "uniform4_ptq", "qat4"} <= rows
  assert "llm_int8, nf4: runtime baselines, not exported" in out
  for name in ("llm_int8", "nf4"):
    assert again["methods"][name]["accuracy"] == report["methods"][name]["accuracy"]
  # The paired comparison reads the row's model too.
  correct, _ = compare.correct(f"{copy}:nf4")
  assert correct.mean() == pytest.approx(report["methods"]["nf4"]["accuracy"], abs=1e-12)
  shutil.rmtree(os.path.join(copy, "uniform4", "checkpoints"))
  with pytest.raises(FileNotFoundError, match="uniform4 holds no checkpoint"):
    experiment.report(config, copy)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(baselines="uniform8,nf5"), ValueError,
     r"Unknown baseline 'nf5'. Valid: uniform<B> .*dynamic_int8, fp4, llm_int8, nf4"),
    (dict(baselines="nf4", **{"numerics_options.nf4.blocksize": 100}), ValueError,
     r"numerics_options.nf4: blocksize must be a power of two in \[32, 4096\].*got 100"),
    (dict(baselines="llm_int8", **{"numerics_options.llm_int8.threshold": -1.0}), ValueError,
     r"numerics_options.llm_int8: threshold must be >= 0"),
    (dict(**{"numerics_options.nf4": {"block_size": 64}}), ValueError,
     r"unknown options \['block_size'\]. Valid: blocksize, double_quant, compute_dtype"),
    (dict(**{"numerics_options.nf5": {}}), KeyError, r"Valid quantizer numerics names: dyn"),
])
def test_bad_names_and_options_are_refused_before_any_work(make_tiny_config, tmp_path,
                                                           overrides, error, match):
  config = make_tiny_config()
  with config.unlocked():
    for key, value in overrides.items():
      node, (*parents, leaf) = config, key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  workdir = str(tmp_path / "w")
  with pytest.raises(error, match=match):
    experiment.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "fp32"))  # nothing trained
  with pytest.raises(error, match=match):  # eval.py's config check
    validate.load_config(workdir, config)


def test_the_bias_study_runs_a_runtime_as_one_setting(tiny_data_dir, tmp_path):
  """configs/bias_study.py:tiny with study.quantizers=nf4: one cell per seed,
  at 4 bits, whose predictions are the hand-built nf4 model's on the cell's
  float model and whose bits are the main job's, by hand."""
  from baq.study.bias import runner  # pylint: disable=import-outside-toplevel
  from configs import bias_study  # pylint: disable=import-outside-toplevel
  c = bias_study.get_config("tiny")
  c.dataset.data_dir = tiny_data_dir
  c.study.quantizers, c.seeds = "nf4", (0,)
  assert [(x.name, x.bits) for x in runner.grid(c)] == [("nf4_s0", 4.0)]
  root = str(tmp_path / "study")
  out = runner.run_study(c, root)
  assert "nf4" in out["settings"]
  rec = json.load(open(os.path.join(root, "nf4_s0", "metrics.json")))
  assert rec["avg_bits"] == pytest.approx((4 * DENSE + 32 * CONV) / (DENSE + CONV))
  test = experiment.load_data(c)["test"]
  hand, variables = _hand_nf4(c, os.path.join(root, "fp32_s0", "run"), test)
  want = predict_logits(hand, variables, test, c.eval_batch_size).argmax(-1)
  got = np.load(os.path.join(root, "nf4_s0", "predictions.npz"))["logits"].argmax(-1)
  np.testing.assert_array_equal(got, want)
