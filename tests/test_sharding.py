"""Sharded training on 8 fake CPU devices matches one device.

Every multi-device run happens in a subprocess of its own (this file run as
a script, `python tests/test_sharding.py WORKER ARGS_JSON`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so the pytest process
keeps its single device. The workers also pass XLA's cheap-compile options
(compiling dominates these runs on CPU; every layout gets the same ones).
With BAQ_MULTIPROCESS_TESTS=1, one more test runs a two-process
`jax.distributed` job (2 devices each) on this machine. How a process decides
to start `jax.distributed` is tested in test_multihost.py.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import CHEAP, ROOT

STEPS = 6  # BAQ: 4 search steps, then 2 at the integer allocation
LAYOUTS = {"one": (1, 1), "data8": (8, 1), "data4_model2": (4, 2)}


def _config(data_dir, data=-1, model=1, **kw):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.dataset.data_dir = data_dir
  c.mesh.data, c.mesh.model = data, model
  c.mesh.fsdp_min_numel = 64  # shard the tiny kernels too
  c.log_every, c.eval_every, c.checkpoint_every = 1, 100, 3
  for k, v in kw.items():
    c[k] = v
  return c


def _dump(path, result):
  np.savez(path, **{"/".join(k): v for k, v in _flat(result).items()})


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = np.asarray(v)
  return out


def _losses(workdir):
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  return np.array([json.loads(l)["loss"] for l in lines])


# ---- workers (run in subprocesses) ----

def worker_train(data_dir, out, runs):
  """Trains (or resumes) tiny BAQ runs: runs = [(workdir, data, model)]."""
  import jax  # pylint: disable=import-outside-toplevel
  from baq.experiment import job as experiment
  from baq.train import sharding, loop as trainer  # pylint: disable=import-outside-toplevel
  data = experiment.load_data(_config(data_dir))
  result = {}
  for workdir, d, m in runs:
    r = trainer.train(_config(data_dir, d, m), workdir, mode="baq", data=data, steps=STEPS,
                      lr=1e-3)
    kernel = r.params["Conv_1"]["kernel"]
    result[os.path.basename(workdir)] = dict(
        params=sharding.to_host(r.params), losses=_losses(workdir),
        kernel_shards=len({str(s.index) for s in kernel.addressable_shards}),
        devices=len(kernel.sharding.device_set))
  if jax.process_index() == 0:
    _dump(out, result)


def worker_group_stats(out):
  """Group losses of one batch on 8 devices and on one, two placements."""
  import jax  # pylint: disable=import-outside-toplevel
  from baq.fairness import losses  # pylint: disable=import-outside-toplevel
  from baq.train import sharding  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  per_ex = rng.gamma(2.0, size=64).astype(np.float32)
  group = np.repeat(np.arange(4), [8, 24, 16, 16]).astype(np.int32)  # group 0: device 0
  spread = rng.permutation(64)  # group 0 over several devices
  fn = lambda l, g: losses.group_stats(l, g, 4).mean
  result = {}
  for name, (d, m) in {"one": (1, 1), "eight": (8, 1)}.items():
    c = tiny.get_config()
    c.mesh.data, c.mesh.model = d, m
    mesh = sharding.make_mesh(c)
    for order, idx in (("blocked", np.arange(64)), ("spread", spread)):
      b = sharding.shard_batch({"l": per_ex[idx], "g": group[idx]}, mesh)
      step = jax.jit(fn, in_shardings=sharding.batch_sharding(mesh),
                     out_shardings=sharding.replicated(mesh))
      result[f"{name}_{order}"] = np.asarray(step(b["l"], b["g"]))
      result[f"{name}_{order}_devices"] = len(b["l"].sharding.device_set)
  result["reference"] = np.array([per_ex[group == g].mean() for g in range(4)])
  _dump(out, result)


def worker_batchnorm(data_dir, out, workdir):
  """A cut-down ResNet-18 (BatchNorm) trained float, then BAQ from it, on a 4x2 mesh."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from baq.experiment import job as experiment
  from baq.train import loop as trainer  # pylint: disable=import-outside-toplevel
  from baq.train.checkpoint import restore_variables  # pylint: disable=import-outside-toplevel
  from baq.data.pipeline import eval_batches  # pylint: disable=import-outside-toplevel
  from baq.train.evaluate import evaluate_split, predict_logits  # pylint: disable=import-outside-toplevel
  from baq.quant.inject import QuantMode  # pylint: disable=import-outside-toplevel
  c = _config(data_dir, 4, 2, eval_every=3)
  c.model.name = "resnet18"
  c.model.kwargs = dict(width=4, stage_sizes=(1, 1), small_stem=True)
  c.quant.finalize_fraction = 0.0  # one compiled step per run
  data = experiment.load_data(c)
  fp = trainer.train(c, os.path.join(workdir, "fp32"), mode="float", data=data, steps=3,
                     lr=1e-2, use_penalties=False)
  start = restore_variables(os.path.join(workdir, "fp32"))
  q = trainer.train(c, os.path.join(workdir, "baq"), mode="baq", data=data, steps=3, lr=1e-3,
                    init_variables=start)
  val, x = data["validation"], next(eval_batches(data["validation"], 64))["image"]
  qmodel = q.model.clone(quant=q.model.quant.replace(mode=QuantMode.EVAL))
  # BatchNorm's initial statistics: mean 0, var 1.
  fresh = jax.tree_util.tree_map_with_path(
      lambda p, s: np.zeros_like(s) if p[-1].key == "mean" else np.ones_like(s),
      jax.device_get(fp.batch_stats))
  manual = jax.jit(functools.partial(qmodel.apply, train=False))
  result = dict(
      fp_stats=jax.device_get(fp.batch_stats), start_stats=start["batch_stats"],
      q_stats=jax.device_get(q.batch_stats), fresh_stats=fresh,
      logits=predict_logits(qmodel, q.variables, val, 64),
      manual=np.asarray(manual(jax.device_get(q.variables), x))[:len(val)],
      fresh_logits=predict_logits(qmodel, dict(q.variables, batch_stats=fresh), val, 64),
      val_acc=_last_val_acc(os.path.join(workdir, "baq")),
      eval_acc=evaluate_split(qmodel, q.variables, val, 64)["accuracy"])
  _dump(out, result)


def _last_val_acc(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [l["val_acc"] for l in lines if "val_acc" in l][-1]


# ---- the parent side ----

def _run(worker, devices=8, cache=None, processes=1, **kwargs):
  """`worker(**kwargs)` in `processes` subprocesses of `devices` CPU devices each."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHEAP}",
             JAX_PLATFORMS="cpu")
  if cache:  # a resumed run compiles what its source run compiled
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if processes > 1:  # one jax.distributed job on this machine
    with socket.socket() as sock:
      sock.bind(("localhost", 0))
      port = sock.getsockname()[1]
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
  logs = [open(f"{kwargs['out']}.{i}.log", "w+") for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), worker,
                             json.dumps(kwargs)], cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                            stdout=log, stderr=log) for i, log in enumerate(logs)]
  for p, log in zip(procs, logs):
    p.wait(timeout=600)
    log.seek(0)
    assert p.returncode == 0, log.read()[-4000:]
    log.close()
  z = np.load(kwargs["out"])
  return {k: z[k] for k in z.files}


def _sub(result, prefix):
  return {k[len(prefix) + 1:]: v for k, v in result.items() if k.startswith(prefix + "/")}


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
  return tiny_data_dir  # built once per session; the workers only read it


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """BAQ runs on 8 devices ((8,) and (4, 2) meshes) and in a 1-device process."""
  root = tmp_path_factory.mktemp("runs")
  wd, cache = {n: str(root / n) for n in LAYOUTS}, str(root / "jit")
  many = _run("worker_train", data_dir=data_dir, out=str(root / "many.npz"), cache=cache,
              runs=[(wd[n], *LAYOUTS[n]) for n in ("data8", "data4_model2")])
  one = _run("worker_train", devices=1, data_dir=data_dir, out=str(root / "one.npz"), cache=cache,
             runs=[(wd["one"], 1, 1)])
  return root, wd, dict(many, **one)


def test_sharded_training_matches_one_device(runs):
  _, _, r = runs
  ref = _sub(r, "one/params")
  assert int(r["data8/devices"]) == 8 and int(r["data4_model2/devices"]) == 8
  assert int(r["data4_model2/kernel_shards"]) == 2  # the kernel really is split over "model"
  for layout in ("data8", "data4_model2"):
    np.testing.assert_allclose(r[f"{layout}/losses"], r["one/losses"], rtol=1e-5)
    got = _sub(r, f"{layout}/params")
    assert got.keys() == ref.keys()
    for k in ref:
      if k.endswith("bits"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{layout} {k}")
      else:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{layout} {k}")
  assert len(r["one/losses"]) == STEPS and np.all(np.isfinite(r["one/losses"]))


def test_checkpoints_move_between_1_and_8_devices(runs, data_dir):
  from baq.train.checkpoint import restore_variables  # pylint: disable=import-outside-toplevel
  root, wd, r = runs
  # Written on 8 devices, read in this 1-device process.
  v = restore_variables(wd["data4_model2"])
  for k, x in _sub(r, "data4_model2/params").items():
    node = v["params"]
    for part in k.split("/"):
      node = node[part]
    np.testing.assert_array_equal(node, x)
  # Resumed across layouts from the step-3 checkpoint: 8 -> 1 and 1 -> 8.
  resumed = {}
  for src, name, devices, mesh in (("data8", "to_one", 1, (1, 1)), ("one", "to_eight", 8, (8, 1))):
    dst = str(root / name)
    shutil.copytree(wd[src], dst)
    shutil.rmtree(os.path.join(dst, "checkpoints", str(STEPS)))
    resumed.update(_run("worker_train", devices=devices, data_dir=data_dir,
                        cache=str(root / "jit"), out=str(root / f"{name}.npz"),
                        runs=[(dst, *mesh)]))
  ref = _sub(r, "one/params")
  for name in ("to_one", "to_eight"):
    for k, x in _sub(resumed, f"{name}/params").items():
      np.testing.assert_allclose(x, ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    # The copied metrics hold steps 1-6, the resumed run appends 4-6 again.
    np.testing.assert_allclose(resumed[f"{name}/losses"][-3:], r["one/losses"][-3:], rtol=1e-5)


@pytest.mark.skipif(os.environ.get("BAQ_MULTIPROCESS_TESTS") != "1",
                    reason="two jax processes (~40 s here); set BAQ_MULTIPROCESS_TESTS=1")
def test_two_processes_match_one_device(runs, data_dir):
  root, _, r = runs
  got = _run("worker_train", devices=2, processes=2, data_dir=data_dir,
             out=str(root / "hosts.npz"), runs=[(str(root / "hosts"), 2, 2)])
  assert int(got["hosts/devices"]) == 4 and int(got["hosts/kernel_shards"]) == 2
  for k, x in _sub(got, "hosts/params").items():
    np.testing.assert_allclose(x, r[f"one/params/{k}"], rtol=1e-5, atol=1e-6, err_msg=k)
  # Only process 0 wrote metrics: one line per step.
  np.testing.assert_allclose(got["hosts/losses"], r["one/losses"], rtol=1e-5)


def test_group_losses_do_not_depend_on_the_device_layout(tmp_path):
  r = _run("worker_group_stats", out=str(tmp_path / "g.npz"))
  assert int(r["eight_blocked_devices"]) == 8 and int(r["one_blocked_devices"]) == 1
  for k in ("one_blocked", "one_spread", "eight_blocked", "eight_spread"):
    np.testing.assert_allclose(r[k], r["reference"], rtol=1e-6, err_msg=k)
  assert r["reference"][0] != r["reference"][1]


def test_batchnorm_model_trains_and_evaluates_with_its_statistics(tmp_path, data_dir):
  r = _run("worker_batchnorm", data_dir=data_dir, out=str(tmp_path / "bn.npz"),
           workdir=str(tmp_path))
  fresh, fp = _sub(r, "fresh_stats"), _sub(r, "fp_stats")
  assert fresh.keys() == fp.keys() and len(fp) >= 10  # mean and var of every BN
  # Float training moved every BN statistic off its initial value.
  for k in fp:
    assert np.max(np.abs(fp[k] - fresh[k])) > 1e-3, k
  # BAQ started from the float model's statistics and kept updating them.
  for k, x in _sub(r, "start_stats").items():
    np.testing.assert_array_equal(x, fp[k])
    assert np.max(np.abs(_sub(r, "q_stats")[k] - x)) > 1e-5, k
  # Evaluation runs in inference mode with the stored statistics.
  np.testing.assert_allclose(r["logits"], r["manual"], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(r["logits"] - r["fresh_logits"])) > 1e-2
  assert float(r["val_acc"]) == pytest.approx(float(r["eval_acc"]))


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  globals()[sys.argv[1]](**json.loads(sys.argv[2]))
