"""The main job end to end on the tiny config, and eval.py's reproduction."""

import json
import os
import shutil
import subprocess
import sys

import flax.traverse_util as tu
import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from baq.models import build_model
from baq.quant.inject import QuantMode
from baq.experiment import job as experiment
from baq.train.checkpoint import restore_params
from baq.train.evaluate import predict_logits
from baq.train.modes import get_mode
from conftest import ROOT


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_config, tiny_float_run):
  """The main job fine-tuning from the session's float model."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = make_tiny_config(init_checkpoint=tiny_float_run)
  return config, workdir, experiment.run(config, workdir)


def test_report_has_every_method_and_metric(run):
  _, workdir, report = run
  on_disk = json.load(open(os.path.join(workdir, "report.json")))
  assert on_disk["methods"].keys() == report["methods"].keys()
  assert {"fp32", "uniform8", "uniform4", "uniform8_ptq", "uniform4_ptq", "baq"} <= set(report["methods"])
  for name, m in report["methods"].items():
    for key in ("accuracy", "worst_group_accuracy", "accuracy_gap", "demographic_parity_gap",
                "equal_opportunity_gap", "equalized_odds_gap", "avg_bits", "size_bytes"):
      assert np.isfinite(m[key]), (name, key)
    assert m["worst_group_accuracy"] <= m["accuracy"] + 1e-9
  assert report["methods"]["uniform4"]["avg_bits"] == 4.0
  assert report["methods"]["fp32"]["size_bytes"] > report["methods"]["uniform8"]["size_bytes"]
  assert not os.path.exists(os.path.join(workdir, "fp32"))  # config.init_checkpoint was used


def _unpack_bits(data: np.ndarray, count: int) -> np.ndarray:
  """The first `count` bits of a uint8 stream, most significant bit of each
  byte first (numpy's packbits order), by shifts: no numpy unpacking."""
  assert data.dtype == np.uint8 and len(data) == -(-count // 8)  # no byte more than needed
  bits = (data[:, None].astype(np.int64) >> np.arange(7, -1, -1)) & 1
  bits = bits.reshape(-1)
  assert not bits[count:].any()  # zero padding only
  return bits[:count]


def _decode_layer(z, layer: str, symmetric: bool):
  """(integer codes in the kernel's shape, bits per output channel, code bytes)
  of one layer of packed_weights.safetensors, decoded here.

  The format (baq/export/packed.py `save_packed`): output channels are grouped by
  bit-width b; group b stores, channel after channel, every weight of the
  channel in the kernel's row-major order over its other axes, each as b
  bits, least significant first, of the code plus 2^(b-1) - 1 (symmetric).
  """
  shape = tuple(int(s) for s in z[f"{layer}::shape"])
  per_ch = z[f"{layer}::bits"].astype(np.int64)
  c, m = shape[-1], int(np.prod(shape[:-1]))
  assert per_ch.shape == (c,)
  rows, seen, code_bytes = np.zeros((c, m), np.int64), np.zeros(c, bool), 0
  for b in sorted(set(per_ch.tolist())):
    channels = z[f"{layer}::b{b}_channels"]
    np.testing.assert_array_equal(channels, np.nonzero(per_ch == b)[0])
    data = z[f"{layer}::b{b}_data"]
    stream = _unpack_bits(data, len(channels) * m * b).reshape(len(channels), m, b)
    unsigned = (stream << np.arange(b)).sum(-1)
    rows[channels] = unsigned - (2 ** (b - 1) - 1 if symmetric else 0)
    seen[channels] = True
    code_bytes += len(data)
  assert seen.all()
  return np.moveaxis(rows.reshape((c,) + shape[:-1]), 0, -1), per_ch, code_bytes


def _quantize_np(kernel: np.ndarray, unit_bits: np.ndarray):
  """Symmetric absmax round-to-nearest in float32 numpy, one scale per unit
  (the whole kernel, or each output channel): (codes, scale)."""
  per_channel = len(unit_bits) > 1
  axes = tuple(range(kernel.ndim - 1)) if per_channel else None
  r = np.max(np.abs(kernel), axis=axes, keepdims=True)
  shape = (1,) * (kernel.ndim - 1) + (len(unit_bits),) if per_channel else (1,) * kernel.ndim
  qmax = (2.0 ** (unit_bits - 1) - 1).astype(np.float32).reshape(shape)
  scale = r / qmax
  assert scale.dtype == np.float32
  return np.clip(np.round(kernel / scale), -qmax, qmax).astype(np.int64), scale


def test_packed_weights_decode_to_the_deployed_kernels_and_logits(run):
  """packed_weights.safetensors, decoded without baq's export code, holds the integer
  codes at bit_allocation.json's bit-widths, and its dequantized kernels in
  the float model give the evaluated model's logits and accuracy."""
  config, workdir, report = run
  assert config.quant.symmetric and config.quant.scale_method == "absmax"
  alloc = json.load(open(os.path.join(workdir, "bit_allocation.json")))
  path = os.path.join(workdir, "packed_weights.safetensors")
  z = safetensors.numpy.load_file(path)
  with safetensors.safe_open(path, framework="numpy") as f:
    meta = f.metadata()
  assert meta["format"] == "baq.packed" and meta["symmetric"] == "true"
  assert json.loads(meta["allocation"]) == alloc
  # The allocation, per layer: one unit ("Conv_0") or one per channel ("Conv_0[3]").
  by_layer = {}
  for u in alloc["units"]:
    by_layer.setdefault(u["name"].split("[")[0], []).append(u)
  assert {k.split("::")[0] for k in z} == set(by_layer)

  params = restore_params(os.path.join(workdir, "baq"))  # integer bits from step 6 on
  flat = tu.flatten_dict(params)
  weight_bits, total_bytes, kernels = 0, 0, {}
  for layer, rows in by_layer.items():
    codes, per_ch, code_bytes = _decode_layer(z, layer, symmetric=True)
    kernel = np.asarray(flat[tuple(layer.split("/")) + ("kernel",)], np.float32)
    assert codes.shape == kernel.shape
    per_channel = len(rows) > 1
    unit_bits = np.array([u["bits"] for u in rows])
    np.testing.assert_array_equal(per_ch, unit_bits if per_channel else
                                  np.full(kernel.shape[-1], unit_bits[0]))
    bits_leaf = [v for k, v in flat.items() if k[:-2] == tuple(layer.split("/"))
                 and k[-1] == "bits"]
    np.testing.assert_array_equal(np.ravel(bits_leaf), unit_bits)  # what the run trained at
    weight_bits += sum(u["numel"] * u["bits"] for u in rows)
    assert sum(u["numel"] for u in rows) == kernel.size
    total_bytes += code_bytes
    # The codes are round-to-nearest of the run's kernel at those bits.
    want, scale = _quantize_np(kernel, unit_bits)
    assert np.abs(codes).max() <= 2 ** (per_ch.max() - 1) - 1
    np.testing.assert_array_equal(codes, want, err_msg=layer)
    np.testing.assert_allclose(z[f"{layer}::scale"], scale, rtol=1e-6)
    np.testing.assert_array_equal(z[f"{layer}::zero_point"], 0.0)
    kernels[layer] = ((codes - z[f"{layer}::zero_point"]) * z[f"{layer}::scale"]).astype(np.float32)
  # Bytes: b bits per weight, rounded up to a byte once per (layer, bit-width).
  groups = sum(len(set(z[f"{l}::bits"].tolist())) for l in by_layer)
  assert weight_bits / 8 <= total_bytes < weight_bits / 8 + groups
  assert report["methods"]["baq"]["packed_code_bytes"] == total_bytes

  # The float model with the decoded kernels is the evaluated model.
  test = experiment.load_data(config)["test"]
  kw = config.model.kwargs.to_dict()
  fmodel = build_model(config.model.name, test.num_classes, None, **kw)
  fparams = {k: v for k, v in flat.items() if k[-1] != "bits"}
  fparams.update({tuple(l.split("/")) + ("kernel",): k for l, k in kernels.items()})
  got = predict_logits(fmodel, {"params": tu.unflatten_dict(fparams)}, test,
                       config.eval_batch_size)
  qmodel = build_model(config.model.name, test.num_classes,
                       get_mode(config, "baq").quantizer.replace(mode=QuantMode.EVAL), **kw)
  want = predict_logits(qmodel, {"params": params}, test, config.eval_batch_size)
  assert np.max(np.abs(got - want)) < 1e-5
  baq = report["methods"]["baq"]
  assert baq["export_max_abs_logit_diff"] < 1e-5
  assert np.mean(np.argmax(got, -1) == test.labels) == pytest.approx(baq["accuracy"], abs=1e-12)
  worst = min(np.mean(np.argmax(got, -1)[test.groups == g] == test.labels[test.groups == g])
              for g in np.unique(test.groups))
  assert worst == pytest.approx(baq["worst_group_accuracy"], abs=1e-12)


def test_exported_allocation_meets_budget(run):
  config, workdir, report = run
  alloc = json.load(open(os.path.join(workdir, "bit_allocation.json")))
  numel = np.array([u["numel"] for u in alloc["units"]])
  bits = np.array([u["bits"] for u in alloc["units"]])
  assert np.all(bits == np.round(bits)) and bits.min() >= 2 and bits.max() <= 8
  assert (numel * bits).sum() <= config.quant.target_bits * numel.sum()
  avg = (numel * bits).sum() / numel.sum()
  assert alloc["avg_bits"] == pytest.approx(avg, rel=1e-12)
  assert report["methods"]["baq"]["avg_bits"] == pytest.approx(avg, abs=1e-5)
  assert alloc["quantized_weights"] == numel.sum()
  cont = np.array([u["bits_continuous"] for u in alloc["units"]])
  assert not np.array_equal(cont, np.round(cont))  # the searched bits, not the deployed
  assert os.path.getsize(os.path.join(workdir, "bit_allocation.png")) > 1000


def test_eval_py_reproduces_the_report(run):
  _, workdir, report = run
  out = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={workdir}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "uniform4_ptq" in out.stdout
  again = json.load(open(os.path.join(workdir, "report.json")))
  assert again["methods"].keys() == report["methods"].keys()
  for name, m in report["methods"].items():
    assert again["methods"][name]["accuracy"] == pytest.approx(m["accuracy"])
    assert again["methods"][name]["worst_group_accuracy"] == pytest.approx(m["worst_group_accuracy"])


def test_only_the_primary_process_writes_the_report(run, tmp_path, monkeypatch):
  config, workdir, report = run
  copy = str(tmp_path / "host1")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "report.json", "bit_allocation.*", "packed_weights.safetensors", "model.onnx"))
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
  again = experiment.report(config, copy)
  assert not {"report.json", "bit_allocation.json", "packed_weights.safetensors",
              "model.onnx"} & set(os.listdir(copy))
  for name, m in report["methods"].items():  # every host still evaluates
    assert again["methods"][name]["worst_group_accuracy"] == pytest.approx(
        m["worst_group_accuracy"])


def test_onnx_export_runs_in_onnxruntime_with_the_same_predictions(run):
  """The main job's model.onnx, run by onnxruntime here (not through baq's
  session helper), gives the deployed model's logits, accuracy and per-group
  accuracy on the test split."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  config, workdir, report = run
  baq = report["methods"]["baq"]
  assert baq["onnx_max_abs_logit_diff"] < 1e-4
  assert baq["onnx_prediction_agreement"] == 1.0 and baq["onnx_group_accuracy_matches"]
  assert baq["onnx_accuracy"] == baq["accuracy"]
  assert baq["onnx_worst_group_accuracy"] == baq["worst_group_accuracy"]
  path = os.path.join(workdir, "model.onnx")
  opts = ort.SessionOptions()
  opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
  sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
  test = experiment.load_data(config)["test"]
  assert sess.get_inputs()[0].type == "tensor(uint8)"  # raw images: normalized in the graph
  logits = sess.run(None, {"images": test.images[:50]})[0]
  assert np.mean(logits.argmax(-1) == test.labels[:50]) == pytest.approx(
      np.mean(predict_logits(build_model(config.model.name, test.num_classes, get_mode(
          config, "baq").quantizer.replace(mode=QuantMode.EVAL), **config.model.kwargs.to_dict()),
          {"params": restore_params(os.path.join(workdir, "baq"))}, test,
          config.eval_batch_size)[:50].argmax(-1) == test.labels[:50]))


def _eval(workdir, *flags):
  return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={workdir}",
                         *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_py_export_writes_only_the_formats_asked(run, tmp_path):
  _, workdir, _ = run
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "report.json", "bit_allocation.*", "packed_weights.safetensors", "model.onnx"))
  out = _eval(copy, "--export=onnx")
  assert out.returncode == 0, out.stderr[-2000:]
  files = set(os.listdir(copy))
  assert "model.onnx" in files and "packed_weights.safetensors" not in files
  assert json.load(open(os.path.join(copy, "report.json")))["methods"]["baq"][
      "onnx_prediction_agreement"] == 1.0


def test_export_refuses_an_unknown_format_and_an_unfinished_workdir(run, tmp_path):
  """What eval.py calls, in this process (eval.py's own runs are the tests above)."""
  from baq.experiment import checks, deploy  # pylint: disable=import-outside-toplevel
  _, workdir, _ = run
  with pytest.raises(Exception, match=r"tflite.*onnx, qwix, safetensors"):
    deploy.export_formats("onnx,tflite")
  # Qwix cannot hold the main job's weight-only convolutions: refused, no file.
  config = checks.load_config(workdir, None)
  with config.unlocked():
    config.export = "qwix"
  with pytest.raises(ValueError, match="Conv_0: a convolution"):
    experiment.report(config, workdir)
  assert not [f for f in os.listdir(workdir) if f.startswith("qwix_rules")]
  # A workdir whose method run stopped early: nothing is evaluated or written.
  copy = str(tmp_path / "unfinished")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "report.json", "bit_allocation.*", "packed_weights.safetensors", "model.onnx"))
  ckpts = os.path.join(copy, "baq", "checkpoints")
  for step in sorted(os.listdir(ckpts), key=lambda x: int(x) if x.isdigit() else -1)[-1:]:
    shutil.rmtree(os.path.join(ckpts, step))
  before = sorted(os.listdir(copy))
  config.export = "onnx"
  with pytest.raises(Exception, match=r"(?s)no finished run.*baq|baq.*no finished run"):
    experiment.report(config, copy)
  assert sorted(os.listdir(copy)) == before


def test_a_failed_export_leaves_no_partial_file(run, tmp_path, monkeypatch):
  """An export that cannot be written (here: codes no ONNX type holds) raises
  and leaves neither the file nor its temporary."""
  from baq.export.onnx import model as onnx_model  # pylint: disable=import-outside-toplevel
  config, workdir, _ = run
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("model.onnx"))
  def refuse(*a, **k):
    raise ValueError("Codes in [0, 70000] fit no ONNX integer type up to 16 bits.")
  monkeypatch.setattr(onnx_model, "code_type", refuse)
  with config.unlocked():
    config.export = "onnx"
  with pytest.raises(ValueError, match="fit no ONNX integer type"):
    experiment.report(config, copy)
  assert not [f for f in os.listdir(copy) if f.startswith("model.onnx")]


def test_compare_pairs_runs_and_reproduces_the_reports_group_accuracies(run):
  """`python -m baq.study.compare` of the run's BAQ against its uniform 4-bit:
  each group's change is the difference of the report's group accuracies."""
  from baq.study import compare  # pylint: disable=import-outside-toplevel
  _, workdir, report = run
  r = compare.compare([f"{workdir}:baq"], [f"{workdir}:uniform4"], num_samples=200)
  m = report["methods"]
  for g in range(len(r["group_names"])):
    a, b = m["baq"]["group_accuracy"][g], m["uniform4"]["group_accuracy"][g]
    assert r["change"]["change"][g] == pytest.approx(a - b, abs=1e-12)
  assert r["worst_group_diff"][0] == pytest.approx(
      m["baq"]["worst_group_accuracy"] - m["uniform4"]["worst_group_accuracy"], abs=1e-12)
  assert 0 <= r["mcnemar_p"][0] <= 1 and len(r["holm_p"]) == len(r["group_names"])
  assert all(h >= p for h, p in zip(r["holm_p"], r["change"]["change_p"]))
  with pytest.raises(ValueError, match="pair them one to one"):
    compare.compare([f"{workdir}:baq"], [])
  with pytest.raises(ValueError, match="WORKDIR:METHOD"):
    compare.compare(["baq"], [f"{workdir}:uniform4"])
  out = subprocess.run([sys.executable, "-m", "baq.study.compare", f"--runs={workdir}:baq",
                        f"--against={workdir}:fp32", "--num_samples=100"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "worst-group difference per pair" in out.stdout


@pytest.mark.parametrize("override,message", [
    ({"baselines": "uniform99"}, r"Baseline uniform99: .*\[1, 16\].*uniform2 \.\. uniform16"),
    ({"baselines": "uniform0"}, r"Baseline uniform0: .*\[1, 16\]"),
    ({"baselines": "uniform1"}, r"Baseline uniform1: a symmetric grid needs at least 2 bits"),
    ({"steps": -5}, r"steps=-5 must be an integer >= 0"),
    ({"float_steps": 0}, r"float_steps=0 must be an integer >= 1"),
    ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
])
def test_impossible_values_are_refused_before_any_work(make_tiny_config, tmp_path, override,
                                                       message):
  with pytest.raises(ValueError, match=message):
    experiment.run(make_tiny_config(**override), str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing written, nothing trained


def test_float_mode_says_it_skips_the_uniform_baselines(make_tiny_config, tiny_float_run,
                                                        tmp_path, capsys):
  config = make_tiny_config(mode="float", init_checkpoint=tiny_float_run, baselines="uniform8")
  out = experiment.run(config, str(tmp_path))
  assert "uniform8" not in out["methods"]
  assert "mode=float trains no quantized model, so the uniform baselines (uniform8) are not " \
         "trained" in capsys.readouterr().out
