"""A numpy reference of the Hugging Face language models, in torch's semantics.

Written straight from the HF state dict and config.json, with no baq code,
so the tests compare baq's Flax models against an independent reading of
the same checkpoint: torch nn.Linear is y = x W^T + b, GPT-2's Conv1D
y = x W + b (c_attn split into q | k | v columns), rotary embeddings in HF's
rotate_half form with repeat_kv for grouped heads, RMSNorm in float32, OPT's
position table offset by 2 with positions cumsum(mask) * mask - 1, and the
causal (plus sliding-window and padding) mask added as the most negative
float. `state_dict_shapes` lists every key and shape of a config, for
random or zero-cost checkpoints.
"""

import math

import numpy as np

NEG = np.finfo(np.float32).min


def layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
  x = x.astype(np.float32)
  return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def gelu_new(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
  return x / (1.0 + np.exp(-x))


def linear(x, sd, name, bias=True):
  """torch nn.Linear: y = x W^T + b."""
  y = x @ sd[f"{name}.weight"].T
  return y + sd[f"{name}.bias"] if bias and f"{name}.bias" in sd else y


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def additive_mask(t, attention_mask=None, window=None):
  """[b or 1, 1, t, t]: 0 where key j <= query i (within window, real key), else NEG."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  ok = j <= i
  if window is not None:
    ok &= j > i - window
  ok = ok[None, None]
  if attention_mask is not None:
    ok = ok & attention_mask.astype(bool)[:, None, None, :]
  return np.where(ok, 0.0, NEG).astype(np.float32)


def sdpa(q, k, v, mask, scale=None):
  """q/k/v [b, h, t, d]; softmax(scale q k^T + mask) v, scale 1/sqrt(d) by default."""
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  scores = scale * q @ k.transpose(0, 1, 3, 2)
  return softmax(np.maximum(scores + mask, NEG)) @ v


def heads(x, n):
  b, t, _ = x.shape
  return x.reshape(b, t, n, -1).transpose(0, 2, 1, 3)


def merge(x):
  b, h, t, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def mask_positions(attention_mask):
  """HF generation's position ids: cumsum(mask) - 1, padding at 0."""
  return np.maximum(np.cumsum(attention_mask, 1) - 1, 0)


def gpt2_logits(sd, cfg, tokens, attention_mask=None):
  sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
  b, t = tokens.shape
  nh, eps = cfg["n_head"], cfg.get("layer_norm_epsilon", 1e-5)
  pos = np.arange(t)[None] if attention_mask is None else mask_positions(attention_mask)
  x = sd["wte.weight"][tokens] + sd["wpe.weight"][pos]
  mask = additive_mask(t, attention_mask)
  for i in range(cfg["n_layer"]):
    p = f"h.{i}."
    h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
    qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]  # Conv1D
    q, k, v = np.split(qkv, 3, axis=-1)
    a = merge(sdpa(heads(q, nh), heads(k, nh), heads(v, nh), mask))
    x = x + a @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
    h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
    h = gelu_new(h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
    x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
  x = layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"], eps)
  return x @ sd["wte.weight"].T


def opt_logits(sd, cfg, tokens, attention_mask=None):
  sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
  b, t = tokens.shape
  nh, d = cfg["num_attention_heads"], cfg["hidden_size"]
  am = np.ones((b, t), np.int64) if attention_mask is None else attention_mask.astype(np.int64)
  pos = np.cumsum(am, 1) * am - 1  # HF OPTLearnedPositionalEmbedding, then + offset 2
  x = sd["decoder.embed_tokens.weight"][tokens] + sd["decoder.embed_positions.weight"][pos + 2]
  mask = additive_mask(t, am)
  for i in range(cfg["num_hidden_layers"]):
    p = f"decoder.layers.{i}."
    h = layer_norm(x, sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"],
                   1e-5)
    q = linear(h, sd, p + "self_attn.q_proj") * (d // nh)**-0.5  # OPT scales q itself
    k, v = linear(h, sd, p + "self_attn.k_proj"), linear(h, sd, p + "self_attn.v_proj")
    a = merge(sdpa(heads(q, nh), heads(k, nh), heads(v, nh), mask, scale=1.0))
    x = x + linear(a, sd, p + "self_attn.out_proj")
    h = layer_norm(x, sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"], 1e-5)
    x = x + linear(np.maximum(linear(h, sd, p + "fc1"), 0.0), sd, p + "fc2")
  x = layer_norm(x, sd["decoder.final_layer_norm.weight"], sd["decoder.final_layer_norm.bias"],
                 1e-5)
  head = sd.get("lm_head.weight", sd["decoder.embed_tokens.weight"])
  return x @ head.T


def rotate_half(x):
  x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
  return np.concatenate([-x2, x1], axis=-1)


def llama_inv_freq(cfg, dim):
  inv = 1.0 / cfg.get("rope_theta", 10000.0)**(np.arange(0, dim, 2) / dim)
  rs = cfg.get("rope_scaling")
  if rs and rs.get("rope_type") == "llama3":  # HF's _compute_llama3_parameters
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv = np.where(medium, smoothed, scaled)
  return inv


def llama_logits(sd, cfg, tokens, attention_mask=None):
  """Llama, Mistral (sliding_window) and Qwen2 (q/k/v biases come from the state dict)."""
  b, t = tokens.shape
  nh = cfg["num_attention_heads"]
  nkv = cfg.get("num_key_value_heads") or nh
  hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
  eps = cfg.get("rms_norm_eps", 1e-6)
  window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
  pos = np.arange(t)[None] if attention_mask is None else mask_positions(attention_mask)
  freqs = pos[..., None] * llama_inv_freq(cfg, hd)  # [b, t, hd/2]
  emb = np.concatenate([freqs, freqs], axis=-1)[:, None]  # [b, 1, t, hd]
  cos, sin = np.cos(emb), np.sin(emb)
  x = sd["model.embed_tokens.weight"][tokens]
  mask = additive_mask(t, attention_mask, window)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
    q = heads(linear(h, sd, p + "self_attn.q_proj"), nh)
    k = heads(linear(h, sd, p + "self_attn.k_proj"), nkv)
    v = heads(linear(h, sd, p + "self_attn.v_proj"), nkv)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)  # repeat_kv
    x = x + linear(merge(sdpa(q, k, v, mask)), sd, p + "self_attn.o_proj")
    h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
    g = silu(linear(h, sd, p + "mlp.gate_proj")) * linear(h, sd, p + "mlp.up_proj")
    x = x + linear(g, sd, p + "mlp.down_proj")
  x = rms_norm(x, sd["model.norm.weight"], eps)
  return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


def logits(sd, cfg, tokens, attention_mask=None):
  """Reference logits [b, t, vocab] (float32 arrays in, float64 math)."""
  fn = {"gpt2": gpt2_logits, "opt": opt_logits}.get(cfg["model_type"], llama_logits)
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  return fn(sd, cfg, np.asarray(tokens), attention_mask)


def state_dict_shapes(cfg):
  """Every key of the checkpoint of HF config `cfg`, with its shape."""
  mt = cfg["model_type"]
  if mt == "gpt2":
    d, v, f = cfg["n_embd"], cfg["vocab_size"], cfg.get("n_inner") or 4 * cfg["n_embd"]
    out = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (cfg["n_positions"], d),
           "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(cfg["n_layer"]):
      p = f"transformer.h.{i}."
      for name, shape in (("ln_1", (d,)), ("ln_2", (d,)), ("attn.c_attn", (d, 3 * d)),
                          ("attn.c_proj", (d, d)), ("mlp.c_fc", (d, f)), ("mlp.c_proj", (f, d))):
        out[p + name + ".weight"], out[p + name + ".bias"] = shape, shape[-1:]
    return out
  if mt == "opt":
    d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["ffn_dim"]
    p0 = "model.decoder."
    out = {p0 + "embed_tokens.weight": (v, d),
           p0 + "embed_positions.weight": (cfg["max_position_embeddings"] + 2, d),
           p0 + "final_layer_norm.weight": (d,), p0 + "final_layer_norm.bias": (d,)}
    for i in range(cfg["num_hidden_layers"]):
      p = f"{p0}layers.{i}."
      for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)),
                          ("self_attn.v_proj", (d, d)), ("self_attn.out_proj", (d, d)),
                          ("fc1", (f, d)), ("fc2", (d, f)), ("self_attn_layer_norm", (d,)),
                          ("final_layer_norm", (d,))):
        out[p + name + ".weight"], out[p + name + ".bias"] = shape, shape[:1]
    return out
  d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
  nh = cfg["num_attention_heads"]
  nkv, hd = cfg.get("num_key_value_heads") or nh, cfg.get("head_dim") or d // nh
  out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not cfg.get("tie_word_embeddings", False):
    out["lm_head.weight"] = (v, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    for name, shape in (("self_attn.q_proj", (nh * hd, d)), ("self_attn.k_proj", (nkv * hd, d)),
                        ("self_attn.v_proj", (nkv * hd, d)), ("self_attn.o_proj", (d, nh * hd)),
                        ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                        ("mlp.down_proj", (d, f)), ("input_layernorm", (d,)),
                        ("post_attention_layernorm", (d,))):
      out[p + name + ".weight"] = shape
      if mt == "qwen2" and name[-6:] in ("q_proj", "k_proj", "v_proj"):
        out[p + name + ".bias"] = shape[:1]
  return out
