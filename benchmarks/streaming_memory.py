"""Peak host memory of training, in-memory split against streamed split.

  python -m benchmarks.streaming_memory [--num_train=20000] [--image_size=64] [--steps=20]
      [--memory_limit_mib=M] [--workers=2]

Prepares the synthetic set with `num_train` training images (once), then in
two fresh processes trains the float SmallCNN for `steps` steps, once with
the split decoded into memory and once with `dataset.stream` (images read
from the records per batch, two grain workers), and prints each process's
peak resident memory (ru_maxrss, workers included) beside the split's image
bytes.

With `--memory_limit_mib` each process runs in a memory cgroup of its own
with that hard limit (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`;
needs a writable cgroup hierarchy, e.g. root in a container), which counts
the workers and the page cache too. The report then says, per path, whether
it finished or was killed, and the cgroup's peak usage: pick a split larger
than the limit to show that the streamed path trains where the in-memory one
cannot.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_integer("num_train", 20000, "Training images of the synthetic set.")
flags.DEFINE_integer("image_size", 64, "Image side.")
flags.DEFINE_integer("steps", 20, "Training steps per run.")
flags.DEFINE_string("data_dir", "/tmp/baq_stream_bench", "tfds data root for the large set.")
flags.DEFINE_integer("memory_limit_mib", None, "Hard memory limit of each run (a cgroup).")
flags.DEFINE_integer("workers", 2, "grain worker processes of the streamed run.")
FLAGS = flags.FLAGS

_CHILD = r"""
import json, resource, sys
from configs import default
from baq.train import experiment, trainer
stream, workdir, data_dir = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
n, size, steps = map(int, sys.argv[4:7])
c = default.get_config()
c.dataset.data_dir = data_dir
c.dataset.kwargs.update(dict(image_size=size, num_train=n, num_validation=64, num_test=64))
c.dataset.stream, c.dataset.workers = stream, int(sys.argv[7]) if stream else 0
c.log_every = c.eval_every = c.checkpoint_every = steps
c.tensorboard = False
data = experiment.load_data(c)
trainer.train(c, workdir, mode="float", data=data, steps=steps, lr=c.optim.lr,
              use_penalties=False, name="fp32")
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(dict(peak_mib=me / 1024, worker_peak_mib=kids / 1024,
                      image_mib=data["train"].images.nbytes / 2**20)))
"""


class Cgroup:
  """A memory cgroup with a hard limit (v2 if mounted, else v1), removed on exit."""

  def __init__(self, limit_mib: int):
    v2, v1 = "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory"
    root = "/sys/fs/cgroup"
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
      v2 = root
    self.v2 = os.path.exists(os.path.join(v2, "cgroup.controllers")) and "memory" in open(
        os.path.join(v2, "cgroup.controllers")).read()
    base = v2 if self.v2 else v1
    self.path = os.path.join(base, f"baq_bench_{os.getpid()}")
    try:
      os.mkdir(self.path)
      limit = str(limit_mib * 2**20)
      self._write("memory.max" if self.v2 else "memory.limit_in_bytes", limit)
      if not self.v2:  # no swap to spill into, if the kernel accounts it
        try:
          self._write("memory.memsw.limit_in_bytes", limit)
        except OSError:
          pass
    except OSError as e:
      raise SystemExit(f"--memory_limit_mib needs a writable memory cgroup under {base}: {e}")

  def _write(self, name: str, value: str) -> None:
    with open(os.path.join(self.path, name), "w") as f:
      f.write(value)

  def peak_mib(self) -> float:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
      p = os.path.join(self.path, name)
      if os.path.exists(p):
        return int(open(p).read()) / 2**20
    return float("nan")

  def enter(self) -> None:  # in the child, before exec
    self._write("cgroup.procs", str(os.getpid()))

  def close(self) -> None:
    try:
      os.rmdir(self.path)
    except OSError:
      pass


def _run(stream: bool) -> dict:
  group = Cgroup(FLAGS.memory_limit_mib) if FLAGS.memory_limit_mib else None
  try:
    with tempfile.TemporaryDirectory() as workdir:
      out = subprocess.run([sys.executable, "-c", _CHILD, "1" if stream else "0", workdir,
                            FLAGS.data_dir, str(FLAGS.num_train), str(FLAGS.image_size),
                            str(FLAGS.steps), str(FLAGS.workers)], capture_output=True,
                           text=True, preexec_fn=group.enter if group else None)
    if out.returncode and group is None:
      raise SystemExit(f"The training process failed:\n{out.stderr[-3000:]}")
    if out.returncode:
      killed = out.returncode in (-signal.SIGKILL, 137)
      res = dict(finished=False, killed=killed, returncode=out.returncode,
                 error=out.stderr.strip().splitlines()[-1:] if not killed else [])
    else:
      res = dict(json.loads(out.stdout.strip().splitlines()[-1]), finished=True)
    if group:
      res["cgroup_peak_mib"] = group.peak_mib()
    return res
  finally:
    if group:
      group.close()


def _line(name: str, r: dict, limit) -> str:
  if not r["finished"]:
    how = "killed at the memory limit" if r["killed"] else f"failed: {r['error']}"
    return f"  {name}: {how} (cgroup peak {r.get('cgroup_peak_mib', float('nan')):.0f} MiB)"
  extra = f", cgroup peak {r['cgroup_peak_mib']:.0f} MiB of {limit} MiB" if limit else ""
  return (f"  {name}: finished, peak RSS {r['peak_mib']:.0f} MiB (largest worker "
          f"{r['worker_peak_mib']:.0f} MiB){extra}")


def main(argv):
  del argv
  limit, FLAGS.memory_limit_mib = FLAGS.memory_limit_mib, None
  first = _run(False)  # prepares the files once, outside the measurement (no limit)
  FLAGS.memory_limit_mib = limit
  mem, streamed = _run(False), _run(True)
  image_mib = first["image_mib"]
  print(f"{FLAGS.num_train} images at {FLAGS.image_size} px: {image_mib:.0f} MiB of uint8 "
        f"images" + (f"; each run limited to {limit} MiB (a cgroup)" if limit else ""))
  print(_line("in memory", mem, limit))
  print(_line(f"streamed ({FLAGS.workers} workers)", streamed, limit))
  print(json.dumps(dict(image_mib=image_mib, limit_mib=limit, in_memory=mem,
                        streamed=streamed)))


if __name__ == "__main__":
  app.run(main)
