r"""The restricted and the full symmetric grid on the embedded data's float SmallCNN.

  python -m benchmarks.vision_grids --float_run=WORKDIR/seed0/fp32

baq's vision path quantizes weights on fake_quant's restricted grid: codes in
[-(2^(b-1) - 1), 2^(b-1) - 1], so 2 bits is ternary. GPTQ's full grid
(`baq.quant.gptq.GRIDS`) has all 2^b levels. This rounds every kernel of a
float model (one the protocol trained: its seed<S>/fp32) to nearest per
output channel on each grid, activations float, no fine-tuning, and prints
accuracy and worst-group accuracy on the protocol's validation split: how
much a full grid could matter before QAT adapts to either.
"""

import argparse

import flax.traverse_util as tu
import jax.numpy as jnp
import numpy as np

from baq.experiment import job
from baq.models import build_model
from baq.quant import gptq
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import predict_logits
from configs import protocol


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--float_run", required=True, help="a protocol seed's fp32 workdir")
  ap.add_argument("--bits", default="2,3,4")
  args = ap.parse_args()
  config = protocol.get_config("channel")
  val = job.load_data(config)["validation"]
  variables = restore_variables(args.float_run)
  model = build_model(config.model.name, val.num_classes, None, **config.model.kwargs.to_dict())
  flat = tu.flatten_dict(variables["params"], sep="/")
  kernels = [k for k, v in flat.items() if k.endswith("kernel")]

  def scores(params):
    correct = predict_logits(model, dict(variables, params=params), val).argmax(-1) == val.labels
    groups = [correct[val.groups == g].mean() for g in range(val.num_groups)]
    return 100 * correct.mean(), 100 * min(groups)

  print("float: accuracy %.2f, worst group %.2f" % scores(variables["params"]))
  for b in (int(x) for x in args.bits.split(",")):
    for grid in gptq.GRIDS:
      q = dict(flat)
      for k in kernels:
        w = np.asarray(flat[k], np.float32)
        q[k] = gptq.rtn(jnp.asarray(w.reshape(-1, w.shape[-1])), b, grid=grid).reshape(w.shape)
      acc, worst = scores(tu.unflatten_dict(q, sep="/"))
      print(f"{b}-bit {grid:10s}: accuracy {acc:.2f}, worst group {worst:.2f}", flush=True)


if __name__ == "__main__":
  main()
