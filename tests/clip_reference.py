"""A numpy reference of CLIP in torch's semantics, from HF and OpenCLIP state dicts.

Written straight from the checkpoints' own names and configs, with no baq
code, so the tests compare baq's Flax CLIP against an independent reading:
torch nn.Linear is y = x W^T + b; the patch conv is a matmul over
(channel, row, column) patches of NCHW pixels; HF's q/k/v/out_proj are
separate Linears and OpenCLIP's in_proj_weight [3w, w] a fused one whose
output splits into q | k | v; quick_gelu is x * sigmoid(1.702 x) and
"gelu" the erf GELU; the text mask is causal (-inf above the diagonal);
OpenCLIP's visual.proj and text_projection are used as x @ proj. The text
feature sits at the argmax of the ids, or at the first eos id (HF: when
text_config.eos_token_id is not the legacy 2; OpenCLIP: pool_type "eos").
Everything runs in float64. `hf_shapes` / `open_clip_shapes` list every key
and shape of a config, for random or zero-cost checkpoints.
"""

import math

import numpy as np
from scipy.special import erf

ACTS = {"quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
        "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))}


def layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, w, b=None):
  return x @ w.T if b is None else x @ w.T + b


def attention(q, k, v, heads, causal):
  """q/k/v [b, t, w] -> softmax(q k^T / sqrt(d) + mask) v, heads merged."""
  b, t, w = q.shape
  split = lambda x: x.reshape(b, t, heads, w // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(w // heads)
  if causal:
    scores = scores + np.triu(np.full((t, t), -np.inf), 1)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  probs = scores / scores.sum(-1, keepdims=True)
  return (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, w)


def patch_embed(pixels, weight):
  """Conv2d(kernel = stride = p, no bias) of NCHW pixels -> [b, patches, w]."""
  b, c, h, w = pixels.shape
  out, _, p, _ = weight.shape
  x = pixels.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, (h // p) * (w // p), c * p * p) @ weight.reshape(out, -1).T


def pool_index(ids, eos_id=None):
  """First position of the largest id (eos_id None) or of eos_id, per row."""
  return ids.argmax(-1) if eos_id is None else (ids == eos_id).argmax(-1)


def _hf_layer(x, sd, p, heads, act, eps, causal):
  h = layer_norm(x, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], eps)
  q, k, v = (linear(h, sd[f"{p}self_attn.{n}_proj.weight"], sd[f"{p}self_attn.{n}_proj.bias"])
             for n in "qkv")
  a = attention(q, k, v, heads, causal)
  x = x + linear(a, sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])
  h = layer_norm(x, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], eps)
  h = ACTS[act](linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
  return x + linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def hf_features(sd, cfg, pixels, ids):
  """(image features, text features), unnormalised, of a CLIPModel state dict."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  vc, tc = cfg["vision_config"], cfg["text_config"]
  eps = vc.get("layer_norm_eps", 1e-5)
  pv = "vision_model."
  x = patch_embed(np.asarray(pixels, np.float64), sd[pv + "embeddings.patch_embedding.weight"])
  cls = np.broadcast_to(sd[pv + "embeddings.class_embedding"], (x.shape[0], 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + sd[pv + "embeddings.position_embedding.weight"]
  x = layer_norm(x, sd[pv + "pre_layrnorm.weight"], sd[pv + "pre_layrnorm.bias"], eps)
  for i in range(vc["num_hidden_layers"]):
    x = _hf_layer(x, sd, f"{pv}encoder.layers.{i}.", vc["num_attention_heads"],
                  vc.get("hidden_act", "quick_gelu"), eps, causal=False)
  pooled = layer_norm(x[:, 0], sd[pv + "post_layernorm.weight"], sd[pv + "post_layernorm.bias"],
                      eps)
  image = linear(pooled, sd["visual_projection.weight"])
  pt, t = "text_model.", ids.shape[1]
  x = (sd[pt + "embeddings.token_embedding.weight"][ids]
       + sd[pt + "embeddings.position_embedding.weight"][:t])
  for i in range(tc["num_hidden_layers"]):
    x = _hf_layer(x, sd, f"{pt}encoder.layers.{i}.", tc["num_attention_heads"],
                  tc.get("hidden_act", "quick_gelu"), eps, causal=True)
  x = layer_norm(x, sd[pt + "final_layer_norm.weight"], sd[pt + "final_layer_norm.bias"], eps)
  eos = tc.get("eos_token_id", 49407)
  x = x[np.arange(len(ids)), pool_index(ids, None if eos == 2 else eos)]
  return image, linear(x, sd["text_projection.weight"])


def _oc_layer(x, sd, p, heads, act, causal):
  h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
  q, k, v = np.split(linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]), 3, -1)
  a = attention(q, k, v, heads, causal)
  x = x + linear(a, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
  h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
  h = ACTS[act](linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
  return x + linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def open_clip_features(sd, cfg, pixels, ids):
  """(image features, text features), unnormalised, of an OpenCLIP state dict."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
  act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
  x = patch_embed(np.asarray(pixels, np.float64), sd["visual.conv1.weight"])
  cls = np.broadcast_to(sd["visual.class_embedding"], (x.shape[0], 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + sd["visual.positional_embedding"]
  x = layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
  for i in range(vc["layers"]):
    x = _oc_layer(x, sd, f"visual.transformer.resblocks.{i}.",
                  vc["width"] // vc.get("head_width", 64), act, causal=False)
  x = layer_norm(x, sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
  image = x[:, 0] @ sd["visual.proj"]
  x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:ids.shape[1]]
  for i in range(tc["layers"]):
    x = _oc_layer(x, sd, f"transformer.resblocks.{i}.", tc["heads"], act, causal=True)
  x = layer_norm(x, sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
  eos = tc.get("eos_id") if tc.get("pool_type", "argmax") == "eos" else None
  return image, x[np.arange(len(ids)), pool_index(ids, eos)] @ sd["text_projection"]


def normalized_logits(image, text, logit_scale):
  """(image embeds, text embeds, logits_per_image) as CLIPModel.forward gives them."""
  image = image / np.linalg.norm(image, axis=-1, keepdims=True)
  text = text / np.linalg.norm(text, axis=-1, keepdims=True)
  return image, text, np.exp(float(logit_scale)) * image @ text.T


def _tower_shapes(prefix, w, mlp, layers, names):
  out = {}
  for i in range(layers):
    for name, shape in names(w, mlp):
      out[prefix.format(i) + name] = shape
  return out


def _hf_layer_shapes(w, mlp):
  for n in ("q", "k", "v", "out"):
    yield f"self_attn.{n}_proj.weight", (w, w)
    yield f"self_attn.{n}_proj.bias", (w,)
  for n in ("layer_norm1", "layer_norm2"):
    yield n + ".weight", (w,)
    yield n + ".bias", (w,)
  yield from (("mlp.fc1.weight", (mlp, w)), ("mlp.fc1.bias", (mlp,)),
              ("mlp.fc2.weight", (w, mlp)), ("mlp.fc2.bias", (w,)))


def hf_shapes(cfg):
  """Every key of a CLIPModel checkpoint of config.json `cfg`, with its shape (no buffers)."""
  vc, tc, e = cfg["vision_config"], cfg["text_config"], cfg["projection_dim"]
  w, p, n = vc["hidden_size"], vc["patch_size"], (vc["image_size"] // vc["patch_size"])**2 + 1
  tw = tc["hidden_size"]
  out = {"vision_model.embeddings.patch_embedding.weight": (w, 3, p, p),
         "vision_model.embeddings.class_embedding": (w,),
         "vision_model.embeddings.position_embedding.weight": (n, w),
         "visual_projection.weight": (e, w), "text_projection.weight": (e, tw),
         "text_model.embeddings.token_embedding.weight": (tc["vocab_size"], tw),
         "text_model.embeddings.position_embedding.weight": (tc["max_position_embeddings"], tw),
         "logit_scale": ()}
  for name, width in (("vision_model.pre_layrnorm", w), ("vision_model.post_layernorm", w),
                      ("text_model.final_layer_norm", tw)):
    out[name + ".weight"], out[name + ".bias"] = (width,), (width,)
  out.update(_tower_shapes("vision_model.encoder.layers.{}.", w, vc["intermediate_size"],
                           vc["num_hidden_layers"], _hf_layer_shapes))
  out.update(_tower_shapes("text_model.encoder.layers.{}.", tw, tc["intermediate_size"],
                           tc["num_hidden_layers"], _hf_layer_shapes))
  return out


def _oc_layer_shapes(w, mlp):
  yield from (("attn.in_proj_weight", (3 * w, w)), ("attn.in_proj_bias", (3 * w,)),
              ("attn.out_proj.weight", (w, w)), ("attn.out_proj.bias", (w,)),
              ("mlp.c_fc.weight", (mlp, w)), ("mlp.c_fc.bias", (mlp,)),
              ("mlp.c_proj.weight", (w, mlp)), ("mlp.c_proj.bias", (w,)))
  for n in ("ln_1", "ln_2"):
    yield n + ".weight", (w,)
    yield n + ".bias", (w,)


def open_clip_shapes(cfg):
  """Every key of an OpenCLIP (ViT) checkpoint of model config `cfg`, with its shape."""
  vc, tc, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
  w, p = vc["width"], vc["patch_size"]
  tw = tc["width"]
  out = {"visual.conv1.weight": (w, 3, p, p), "visual.class_embedding": (w,),
         "visual.positional_embedding": ((vc["image_size"] // p)**2 + 1, w),
         "visual.proj": (w, e), "text_projection": (tw, e),
         "token_embedding.weight": (tc["vocab_size"], tw),
         "positional_embedding": (tc["context_length"], tw), "logit_scale": ()}
  for name, width in (("visual.ln_pre", w), ("visual.ln_post", w), ("ln_final", tw)):
    out[name + ".weight"], out[name + ".bias"] = (width,), (width,)
  out.update(_tower_shapes("visual.transformer.resblocks.{}.", w,
                           int(w * vc.get("mlp_ratio", 4.0)), vc["layers"], _oc_layer_shapes))
  out.update(_tower_shapes("transformer.resblocks.{}.", tw, int(tw * tc.get("mlp_ratio", 4.0)),
                           tc["layers"], _oc_layer_shapes))
  return out
