r"""baq's symmetric 4-bit grid against GPTQ's on stories260K's projections.

  python -m benchmarks.gptq_grids

baq's symmetric grid is fake_quant's: scale = absmax / (2^(b-1) - 1), codes
in [-(2^(b-1) - 1), 2^(b-1) - 1] (15 levels at 4 bits). GPTQ's symmetric
grid (the reference code, GPTQModel, the GPTQ format's zero point 2^(b-1))
is scale = 2 absmax / (2^b - 1), codes in [-2^(b-1), 2^(b-1) - 1] (16
levels). Per output channel, both from the same absmax, round to nearest:
this prints the squared weight error of each and the perplexity on the
TinyStories windows `benchmarks.gptq_vs_gptqmodel` scores, so a gap between
baq's GPTQ and GPTQModel's can be split into grid and algorithm. Needs
../shared/data/lm.
"""

import os

import flax.traverse_util as tu
import numpy as np

from benchmarks.gptq_vs_gptqmodel import LM, _ppl, _windows


def rtn(w: np.ndarray, bits: int, grid: str) -> np.ndarray:
  """w [d_in, d_out] rounded per output channel on `grid` ("baq" or "gptq")."""
  a = np.maximum(np.abs(w).max(0, keepdims=True), np.finfo(np.float32).tiny)
  top = 2 ** (bits - 1) - 1
  if grid == "baq":
    s = a / top
    return np.clip(np.round(w / s), -top, top) * s
  s = 2 * a / (2 ** bits - 1)
  return np.clip(np.round(w / s), -top - 1, top) * s


def main() -> None:
  from baq.models.lm import gguf  # pylint: disable=import-outside-toplevel
  model, variables, tokenizer, _ = gguf.load_gguf(os.path.join(LM, "stories260K.gguf"))
  evals = _windows(tokenizer, os.path.join(LM, "tinystories_valid_sample.txt"), None, 127)
  flat = tu.flatten_dict(variables["params"], sep="/")
  kernels = [k for k in flat if k.startswith("block_") and k.endswith("/kernel")]
  print(f"stories260K: {len(kernels)} projection kernels; float perplexity "
        f"{_ppl(model, variables['params'], evals):.3f}")
  for bits in (4, 3):
    for grid in ("baq", "gptq"):
      q = dict(flat)
      err = 0.0
      for k in kernels:
        w = np.asarray(flat[k], np.float64)
        q[k] = rtn(w, bits, grid).astype(np.float32)
        err += float(((w - q[k]) ** 2).sum())
      params = tu.unflatten_dict(q, sep="/")
      print(f"{bits}-bit {grid:4s} grid: squared weight error {err:.2f}, RTN perplexity "
            f"{_ppl(model, params, evals):.3f}", flush=True)


if __name__ == "__main__":
  main()
