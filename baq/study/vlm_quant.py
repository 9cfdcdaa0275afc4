"""The CLIP study's model side: the in-run CLIP, its embeddings, and every quantizer.

Quantizers (`QUANTIZERS`; an unknown name lists the valid ones):
  fp32          the float model
  rtn8, rtn4    round to nearest on baq's symmetric per-output-channel grid
                (`baq.quant.gptq.rtn`), every layer of `quant.layers`
  llm_int8      bitsandbytes' LLM.int8 (outlier features in float16)
  nf4           QLoRA's 4-bit NormalFloat, blockwise absmax, double quant
  dynamic_int8  torch's dynamic quantization (per-tensor uint8 activations,
                int8 weights)
  mixed4        baq's fairness-aware mixed precision at 4.0 average bits:
                each layer's cost at 2, 3, 4 and 8 bits for each group's
                zero-shot loss (`baq.allocation.lm_importance`), the
                config's reducer, the exact allocator, then RTN per layer
The three runtimes' numerics (`baq.quant.numerics`) are injected through
`QuantSpec.numerics` on the Dense layers of `quant.layers`; their
convolutions stay float, as in bitsandbytes and torch.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation import lm_importance, planner
from baq.models.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from baq.quant import gptq
from baq.quant.inject import QuantSpec, Quantizer
from baq.registry import Registry
from baq.train import fit

QUANTIZERS: Registry[str] = Registry("CLIP study quantizer")
for _name in ("fp32", "rtn8", "rtn4", "llm_int8", "nf4", "dynamic_int8", "mixed4"):
  QUANTIZERS.register(_name)(_name)
NUMERICS = {"llm_int8": 8.0, "nf4": 4.0, "dynamic_int8": 8.0}  # nominal weight bits


def normalize(images: np.ndarray) -> jnp.ndarray:
  """uint8 images -> the float inputs the in-run CLIP trains on."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.25


def clip_config(config, vocab: int, eos_id: int) -> CLIPConfig:
  m = config.model
  return CLIPConfig(
      vision=VisionConfig(image_size=config.data.image_size, patch_size=m.patch_size,
                          width=m.width, layers=m.layers, heads=m.heads, mlp_dim=4 * m.width),
      text=TextConfig(vocab_size=vocab, context_length=config.data.max_len, width=m.width,
                      layers=m.layers, heads=m.heads, mlp_dim=4 * m.width, pool="eos",
                      eos_token_id=eos_id),
      embed_dim=m.embed_dim, activation="quick_gelu")


def contrastive_loss(model: CLIP, params, images, tokens) -> jax.Array:
  """CLIP's symmetric cross-entropy over the batch's image-caption pairs."""
  img, txt, scale = model.apply({"params": params}, images, tokens)
  logits = scale * img @ txt.T
  labels = jnp.arange(len(img))
  ce = lambda l: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(l), labels[:, None], 1))
  return 0.5 * (ce(logits) + ce(logits.T))


def train_clip(model: CLIP, images: np.ndarray, tokens: np.ndarray, config, seed: int,
               workdir: Optional[str]) -> Any:
  """The in-run CLIP on (image, caption) pairs, with `baq.train.fit` (resumable)."""
  t = config.train
  cfg = fit.FitConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                      warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, seed=seed,
                      save_every=t.save_every)
  x0 = normalize(images[:1])
  params = model.init(jax.random.key(seed), x0, jnp.asarray(tokens[:1]))["params"]
  batch = lambda rows: (normalize(images[rows]), jnp.asarray(tokens[rows]))
  loss = lambda p, b: contrastive_loss(model, p, *b)
  return fit.fit(params, loss, batch, len(images), cfg, workdir)[0]


def embeddings(model: CLIP, params, images: np.ndarray, prompts: np.ndarray,
               queries: np.ndarray, batch_size: int = 256) -> dict:
  """Normalised embeddings: images [n, e], class prompts [C, T, e], queries [q, e]."""
  img_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))
  txt_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIP.encode_text))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  img = np.concatenate([np.asarray(img_fn(params, normalize(images[i:i + batch_size])))
                        for i in range(0, len(images), batch_size)])
  c, t = prompts.shape[:2]
  cls = np.asarray(txt_fn(params, jnp.asarray(prompts.reshape(c * t, -1)))).reshape(c, t, -1)
  return dict(image=unit(img), classes=unit(unit(cls).mean(1)),
              queries=unit(np.asarray(txt_fn(params, jnp.asarray(queries)))))


def layer_names(params, pattern: str) -> list[str]:
  """Dense layers (kernels of rank 2) whose paths fully match `pattern`."""
  flat = tu.flatten_dict(params, sep="/")
  return [k[:-len("/kernel")] for k, v in flat.items()
          if k.endswith("/kernel") and np.ndim(v) == 2 and re.fullmatch(pattern, k[:-7])]


def rtn_params(params, bits: dict) -> Any:
  """params with each named layer's kernel rounded to nearest at its bits."""
  flat = dict(tu.flatten_dict(params, sep="/"))
  for name, b in bits.items():
    flat[f"{name}/kernel"] = gptq.rtn(jnp.asarray(flat[f"{name}/kernel"]), int(b))
  return tu.unflatten_dict(flat, sep="/")


def zero_shot_group_loss(model: CLIP, images, labels, groups, prompts, num_groups: int):
  """params -> [G] mean zero-shot cross-entropy per group (the allocation's groups)."""
  x, y = normalize(images), jnp.asarray(labels)
  onehot = jnp.asarray(np.eye(num_groups)[groups].T, jnp.float32)  # [G, n]
  c, t = prompts.shape[:2]
  toks = jnp.asarray(prompts.reshape(c * t, -1))

  def fn(params):
    img = model.apply({"params": params}, x, method=CLIP.encode_image)
    txt = model.apply({"params": params}, toks, method=CLIP.encode_text)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    cls = txt.reshape(c, t, -1).mean(1)
    cls = cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)
    logits = jnp.exp(params["logit_scale"]) * img @ cls.T
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
    return onehot @ ce / jnp.maximum(onehot.sum(1), 1.0)

  return fn


def quantized(name: str, model: CLIP, params, config, calib: dict) -> tuple[CLIP, Any, dict]:
  """(model, params, info) of one quantizer; `calib` holds the allocation's images."""
  QUANTIZERS.get(name)
  layers = layer_names(params, config.quant.layers)
  if name == "fp32":
    return model, params, dict(avg_bits=32.0)
  if name in NUMERICS:
    spec = QuantSpec(numerics=name)
    qmodel = CLIP(model.config, Quantizer(rules=((config.quant.layers, spec),), training=False))
    return qmodel, params, dict(avg_bits=NUMERICS[name], layers=layers)
  if name.startswith("rtn"):
    b = int(name[3:])
    return model, rtn_params(params, {l: b for l in layers}), dict(avg_bits=float(b))
  loss = zero_shot_group_loss(model, calib["images"], calib["labels"], calib["groups"],
                              calib["prompts"], calib["num_groups"])
  analysis = lm_importance.analyse(loss, params, layers, measure=config.quant.measure,
                                   choices=(2, 3, 4, 8))
  bits = planner.allocate(analysis, float(name[len("mixed"):]), reducer=config.quant.reducer)
  per_layer = {l: int(b) for l, b in zip(layers, bits)}
  avg = float((analysis.numel * bits).sum() / analysis.numel.sum())
  return model, rtn_params(params, per_layer), dict(avg_bits=avg, bits=per_layer)
