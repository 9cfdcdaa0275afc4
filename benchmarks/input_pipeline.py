"""Input throughput per core of the in-memory batcher, plain and with the paper recipe.

  python -m benchmarks.input_pipeline [--image_size=224] [--batch_size=64] [--steps=10]

Random uint8 images in memory (a split of 512 at the given size), batches of
`Batcher.batch(step)` (sampling, flips, normalisation) with horizontal flips
only and with `baq.data.augment.PAPER_RECIPE` (random-resized crop, both
flips, colour jitter), on one thread of this process: BLAS is held to one
thread too (set before numpy loads), so the figures are images/s per core,
what each of `dataset.workers` processes adds. Prints both and the recipe's
cost as a ratio to the plain batcher, measured side by side.
"""

import os
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")  # one core: the jitter's grey products call BLAS

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from baq.data import augment  # noqa: E402
from baq.data.datasets import Split  # noqa: E402
from baq.data.pipeline import Batcher  # noqa: E402

flags.DEFINE_integer("image_size", 224, "Image side.")
flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
flags.DEFINE_integer("steps", 10, "Timed batches per setting.")
FLAGS = flags.FLAGS


def _rate(batcher: Batcher, steps: int) -> float:
  batcher.batch(0)
  t = time.perf_counter()
  for s in range(1, steps + 1):
    batcher.batch(s)
  return steps * batcher.batch_size / (time.perf_counter() - t)


def main(argv):
  del argv
  n, size = 512, FLAGS.image_size
  images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3)).astype(np.uint8)
  split = Split(images, np.zeros(n, np.int32), np.arange(n) % 4, 2, 4, ("a", "b"),
                tuple("wxyz"), "bench")
  plain = _rate(Batcher(split, FLAGS.batch_size, flip=True), FLAGS.steps)
  paper = _rate(Batcher(split, FLAGS.batch_size, augment=augment.PAPER_RECIPE), FLAGS.steps)
  print(f"{size} px, batch {FLAGS.batch_size}, one thread (images/s per core):")
  print(f"  in-memory batcher, flip only     {plain:9.1f} images/s")
  print(f"  in-memory batcher, paper recipe  {paper:9.1f} images/s  ({paper / plain:.3f}x)")


if __name__ == "__main__":
  app.run(main)
