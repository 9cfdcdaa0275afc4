"""Peak host memory of training, in-memory split against streamed split.

  python -m benchmarks.streaming_memory [--num_train=20000] [--image_size=64] [--steps=20]

Prepares the synthetic set with `num_train` training images (once), then in
two fresh processes trains the float SmallCNN for `steps` steps, once with
the split decoded into memory and once with `dataset.stream` (images read
from the records per batch, two grain workers), and prints each process's
peak resident memory (ru_maxrss, workers included) beside the split's image
bytes.
"""

import json
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_integer("num_train", 20000, "Training images of the synthetic set.")
flags.DEFINE_integer("image_size", 64, "Image side.")
flags.DEFINE_integer("steps", 20, "Training steps per run.")
flags.DEFINE_string("data_dir", "/tmp/baq_stream_bench", "tfds data root for the large set.")
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
c.dataset.stream, c.dataset.workers = stream, 2 if stream else 0
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


def _run(stream: bool) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    out = subprocess.run([sys.executable, "-c", _CHILD, "1" if stream else "0", workdir,
                          FLAGS.data_dir, str(FLAGS.num_train), str(FLAGS.image_size),
                          str(FLAGS.steps)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  _run(False)  # prepares the files once, outside the measurement
  mem, streamed = _run(False), _run(True)
  print(f"{FLAGS.num_train} images at {FLAGS.image_size} px: "
        f"{mem['image_mib']:.0f} MiB of uint8 images")
  print(f"  in memory: peak RSS {mem['peak_mib']:7.0f} MiB")
  print(f"  streamed:  peak RSS {streamed['peak_mib']:7.0f} MiB (largest worker "
        f"{streamed['worker_peak_mib']:.0f} MiB)  ({streamed['peak_mib'] / mem['peak_mib']:.2f}x)")


if __name__ == "__main__":
  app.run(main)
