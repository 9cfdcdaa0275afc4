"""Zero-shot CLIP throughput: full precision against each fake-quantized variant.

  python -m benchmarks.vlm_throughput [--size=small|b32] [--batch=64] [--repeats=5]

A random CLIP (`small`: the CLIP study's model, 32 px; `b32`: ViT-B/32's
image tower at 224 px, weights random: speed does not depend on training)
encodes the same batch of images and scores them against 3 class
embeddings, jitted, in this one process: full precision, RTN at 8 and 4
bits (kernels rounded once, then a float model: the same speed as float),
and the runtimes' numerics injected into every Dense layer of the blocks and
projections (LLM.int8's outlier split and int8 products, NF4's blockwise
dequantization, dynamic int8's per-call activation quantization), which
quantize inside the forward pass as those runtimes' CPU emulation does.
Printed: images/s (median of `repeats` timed calls after a warm-up) and the
ratio to full precision. On CPU the numerics are emulations in float32 and
int32, not the runtimes' kernels: the ratios say what baq's fake
quantization costs, not what bitsandbytes would run at.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from baq.quant import methods
from baq.quant.inject import QuantMode, QuantSpec, Quantizer
from baq.study.vlm import quant as vlm_quant

LAYERS = r"(vision|text)/block_\d+/(attn|mlp)/.*|visual_projection|text_projection"
SIZES = {
    "small": CLIPConfig(vision=VisionConfig(32, 8, 64, 2, 2, 256),
                        text=TextConfig(128, 16, 64, 2, 2, 256), embed_dim=32),
    "b32": CLIPConfig(),
}


def _define_flags() -> None:
  flags.DEFINE_enum("size", "small", list(SIZES), "Model size.")
  flags.DEFINE_integer("batch", 64, "Images per call.")
  flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")


def _rate(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  cfg = SIZES[f.size]
  model = CLIP(cfg)
  s = cfg.vision.image_size
  images = jax.random.normal(jax.random.key(1), (f.batch, s, s, 3), jnp.float32)
  tokens = jnp.ones((3, 8), jnp.int32)
  params = model.init(jax.random.key(0), images[:1], tokens[:1])["params"]
  classes = model.apply({"params": params}, tokens, method=CLIP.encode_text)

  def zero_shot(m):
    def fn(p, x):
      img = m.apply({"params": p}, x, method=CLIP.encode_image)
      return jnp.argmax(img @ classes.T, -1)
    return jax.jit(fn)

  layers = vlm_quant.layer_names(params, LAYERS)
  variants = {"fp32": (model, params)}
  for b in (8, 4):
    variants[f"rtn{b}"] = (model, vlm_quant.rtn_params(params, {l: b for l in layers}))
  for name in methods.RUNTIMES:
    q = Quantizer(rules=((LAYERS, QuantSpec(numerics=name)),), mode=QuantMode.EVAL)
    variants[name] = (CLIP(cfg, q), params)
  print(f"CLIP {f.size}: {f.batch} images of {s} px, median of {f.repeats} calls")
  base = None
  for name, (m, p) in variants.items():
    sec = _rate(zero_shot(m), p, images, repeats=f.repeats)
    base = base or sec
    print(f"  {name:13s} {f.batch / sec:10.1f} images/s   {base / sec:5.2f}x full precision")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
