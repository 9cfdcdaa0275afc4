"""The CLIP study's model side: the in-run CLIP, its embeddings, and every quantizer.

Quantizers (`QUANTIZERS`, methods of `baq.quant.methods`, spelled as
`parse` reads them; an unknown name lists the valid ones):
  fp32          the float model
  rtn@8, rtn@4  round to nearest on baq's symmetric per-output-channel grid
  (rtn8, rtn4)  (`baq.quant.gptq.rtn`), every layer of `quant.layers`
  mixed@4       baq's fairness-aware mixed precision at 4.0 average bits:
  (mixed4)      each layer's cost at 2, 3, 4 and 8 bits for each group's
                zero-shot loss (`baq.allocation.lm_importance`), the
                config's reducer, the exact allocator, then RTN per layer
  llm_int8, nf4, fp4, dynamic_int8 (every method of kind "numerics")
                a runtime's numerics (`baq.quant.numerics`: LLM.int8, QLoRA's
                NF4 / FP4, torch's dynamic int8), at its code bits
The runtimes' numerics are injected through `QuantSpec.numerics` on the
Dense layers of `quant.layers`; their convolutions stay float, as in
bitsandbytes and torch.

Model sources (`SOURCES`, `config.model.source`): "train" (the in-run CLIP,
trained by `baq.study.vlm.data.prepare` on the data's captions, inputs normalised with
`IN_RUN_STATS`), "hf" (a local Hugging Face CLIP folder) and "open_clip"
(OpenCLIP safetensors and model config), whose texts go through the
checkpoint's own tokenizer (`encode_texts`) and whose images are normalised
with CLIP's mean and std (`CLIP_STATS`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from baq.allocation import lm_importance, planner
from baq.data.text import tokenizer as tok
from baq.models.clip import convert
from baq.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, eos_positions
from baq.quant import gptq, methods
from baq.quant.inject import QuantMode, QuantSpec, Quantizer
from baq.registry import Registry
from baq.train import fit

QUANTIZERS = methods.Choices("CLIP study quantizer", ("fp32", "rtn", "mixed"), ("numerics",))
# Per-channel (mean, std) of [0, 1] pixels: the in-run CLIP's, and OpenAI CLIP's.
IN_RUN_STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def normalize(images: np.ndarray, stats=IN_RUN_STATS) -> jnp.ndarray:
  """uint8 images -> float model inputs, (x / 255 - mean) / std per channel."""
  mean, std = (jnp.asarray(v, jnp.float32) for v in stats)
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def parse(name: str) -> tuple[methods.Method, Optional[float]]:
  """A quantizer's (method, bits or budget): "rtn@4" (or "rtn4") -> (rtn, 4.0).

  The study's first spellings, a method's name with its bits and no "@"
  ("rtn8", "mixed4"), are read as "rtn@8", "mixed@4".

  Raises:
    KeyError: a method this study does not run (those it runs listed).
    ValueError: bits out of the method's bounds, or an alpha (none is used here).
  """
  name = name.strip()
  short = re.fullmatch(r"([a-z_]+?)(\d+(?:\.\d+)?)", name)
  if short and short[1] in QUANTIZERS and QUANTIZERS.get(short[1]).takes:
    name = f"{short[1]}@{short[2]}"
  method, bits, alpha = QUANTIZERS.parse(name)
  if alpha is not None:
    raise ValueError(f"{name!r}: the CLIP study's methods take no alpha.")
  return method, bits


def needs_calibration(name: str) -> bool:
  """Whether a quantizer uses zero-shot group losses on calibration images."""
  return parse(name)[0].kind == "search"


SOURCES: Registry = Registry("CLIP study model source")
SOURCES.register("train")(None)  # the in-run CLIP: built and trained by vlm_data.prepare


def _tokenizer(m, own: Optional[Tokenizer], where: str) -> Tokenizer:
  """model.tokenizer (a tokenizer.json, or a folder holding one), else the checkpoint's own."""
  if m.tokenizer:
    return tok.load_tokenizer(m.tokenizer)
  if own is None:
    raise FileNotFoundError(f"model.source={m.source!r} needs the checkpoint's tokenizer: "
                            f"{where} is missing; set model.tokenizer to its tokenizer.json.")
  return own


@SOURCES.register("hf")
def _hf(m) -> tuple[CLIP, Any, Tokenizer]:
  """A local Hugging Face CLIP folder: (model, params, tokenizer)."""
  if not m.hf_folder or not os.path.isdir(m.hf_folder):
    raise FileNotFoundError(f"model.hf_folder {m.hf_folder!r} is not a folder; point it at a "
                            "local Hugging Face CLIP folder (config.json, model.safetensors, "
                            "tokenizer.json).")
  model, variables, own = convert.load(m.hf_folder)
  return model, variables["params"], _tokenizer(m, own, os.path.join(m.hf_folder,
                                                                     tok.FILENAME))


@SOURCES.register("open_clip")
def _open_clip(m) -> tuple[CLIP, Any, Tokenizer]:
  """OpenCLIP weights and model config, with model.tokenizer: (model, params, tokenizer)."""
  for field in ("open_clip_weights", "open_clip_config"):
    if not m[field]:
      raise ValueError(f"model.source='open_clip' needs model.{field}.")
  model, variables = convert.load_open_clip(m.open_clip_weights, m.open_clip_config)
  return model, variables["params"], _tokenizer(m, None, "model.tokenizer")


def encode_texts(tokenizer: Tokenizer, texts, text: TextConfig) -> np.ndarray:
  """int32 [m, context_length]: <|startoftext|> ids <|endoftext|>, then the pad id (or 0).

  The tokenizer's own post-processor adds the markers (CLIP's does); they are
  added here where it does not. A text longer than the context is cut
  keeping its <|endoftext|>. The model's pooling rule must find that token.

  Raises:
    ValueError: the tokenizer has no <|endoftext|>, an id is outside the
      vocabulary, or the pooling rule would read another position (the
      first such text named).
  """
  tk = Tokenizer.from_str(tokenizer.to_str())  # a copy without padding / truncation
  pad = tk.padding["pad_id"] if tk.padding else 0
  tk.no_padding()
  tk.no_truncation()
  sot, eot, ctx = tk.token_to_id(SOT), tk.token_to_id(EOT), text.context_length
  if eot is None:
    raise ValueError(f"The tokenizer has no {EOT} token: it is not CLIP's tokenizer.")
  out = np.full((len(texts), ctx), pad, np.int32)
  ends = np.empty(len(texts), np.int64)
  for i, e in enumerate(tk.encode_batch(list(texts))):
    ids = list(e.ids)
    ids = ids if sot is None or ids[:1] == [sot] else [sot] + ids
    ids = ids if ids[-1:] == [eot] else ids + [eot]
    ids = ids if len(ids) <= ctx else ids[:ctx - 1] + [eot]
    out[i, :len(ids)], ends[i] = ids, len(ids) - 1
  if out.size and out.max() >= text.vocab_size:
    raise ValueError(f"Token id {out.max()} is outside the model's vocabulary "
                     f"({text.vocab_size}): the tokenizer is not the checkpoint's.")
  pos = np.asarray(eos_positions(jnp.asarray(out), text))
  if np.any(pos != ends):
    i = int(np.flatnonzero(pos != ends)[0])
    raise ValueError(f"The text tower pools position {pos[i]} of {texts[i]!r} (rule "
                     f"{text.pool!r}, eos id {text.eos_token_id}) but its {EOT} (id {eot}) "
                     f"is at {ends[i]}: the tokenizer does not fit the checkpoint.")
  return out


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


def embeddings(model: CLIP, params, images: np.ndarray, prompts: Optional[np.ndarray],
               queries: Optional[np.ndarray], stats=IN_RUN_STATS, batch_size: int = 256) -> dict:
  """Normalised embeddings: images [n, e], class prompts [C, T, e], queries [q, e].

  `prompts` or `queries` None (a data kind without that task) gives None.
  """
  img_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))
  txt_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIP.encode_text))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  text = lambda t: np.asarray(txt_fn(params, jnp.asarray(t)))
  img = np.concatenate([np.asarray(img_fn(params, normalize(images[i:i + batch_size], stats)))
                        for i in range(0, len(images), batch_size)])
  out = dict(image=unit(img), classes=None, queries=None)
  if prompts is not None:
    c, t = prompts.shape[:2]
    out["classes"] = unit(unit(text(prompts.reshape(c * t, -1)).reshape(c, t, -1)).mean(1))
  if queries is not None:
    out["queries"] = unit(text(queries))
  return out


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


def zero_shot_group_loss(model: CLIP, images, labels, groups, prompts, num_groups: int,
                         stats=IN_RUN_STATS):
  """params -> [G] mean zero-shot cross-entropy per group (the allocation's groups)."""
  x, y = normalize(images, stats), jnp.asarray(labels)
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


def quantized(name: str, model: CLIP, params, config,
              calib: Optional[dict]) -> tuple[CLIP, Any, dict]:
  """(model, params, info) of one quantizer.

  `calib` (`baq.study.vlm.data.calibration`) holds the allocation's images,
  labels, groups, prompts and normalisation; only mixed reads it.
  """
  method, level = parse(name)
  layers = layer_names(params, config.quant.layers)
  if method.kind == "float":
    return model, params, dict(avg_bits=32.0)
  if method.kind == "numerics":
    spec = QuantSpec(numerics=method.name)
    qmodel = CLIP(model.config, Quantizer(rules=((config.quant.layers, spec),),
                                          mode=QuantMode.EVAL))
    if not layers:  # nothing matched: the nominal bits of the type
      return qmodel, params, dict(avg_bits=methods.nominal_bits(method.name), layers=layers)
    flat = tu.flatten_dict(params, sep="/")
    stored = methods.stored_bits(method.name, [flat[f"{l}/kernel"].shape for l in layers])
    return qmodel, params, dict(avg_bits=stored["code_bits"],
                                bits_per_weight=stored["bits_per_weight"], layers=layers)
  if method.name == "rtn":
    b = int(level)
    return model, rtn_params(params, {l: b for l in layers}), dict(avg_bits=float(b))
  loss = zero_shot_group_loss(model, calib["images"], calib["labels"], calib["groups"],
                              calib["prompts"], calib["num_groups"], calib["stats"])
  analysis = lm_importance.analyse(loss, params, layers, measure=config.quant.measure,
                                   choices=(2, 3, 4, 8))
  bits = planner.allocate(analysis, level, reducer=config.quant.reducer)
  per_layer = {l: int(b) for l, b in zip(layers, bits)}
  avg = float((analysis.numel * bits).sum() / analysis.numel.sum())
  return model, rtn_params(params, per_layer), dict(avg_bits=avg, bits=per_layer)
