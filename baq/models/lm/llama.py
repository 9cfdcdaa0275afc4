"""Llama, Mistral and Qwen2 checkpoints (one layout) as a baq `CausalLM`, and back.

The three share HF's Llama layout: RMSNorm, rotary positions in the
rotate_half convention (the checkpoints' q/k rows are already permuted for
it, so they load unchanged), grouped-query attention and a SwiGLU MLP. They
differ in a few fields: Qwen2 has q/k/v biases (not o_proj), Llama's
attention_bias puts biases on all four and mlp_bias on the MLP, and Mistral
has a sliding window (config.json's sliding_window; null for none).

HF names ("model." prefix): embed_tokens, layers.{i}.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj},
norm, and lm_head unless tie_word_embeddings. Old checkpoints' rotary
inv_freq buffers are skipped.

Rope scaling: none ("default") or Llama 3's "llama3"; others (linear,
dynamic, yarn, ...) are refused, as is Qwen2's use_sliding_window (a window
on only some layers), naming the field. Both the old config.json fields
(rope_theta, rope_scaling) and transformers v5's rope_parameters are read.
"""

from __future__ import annotations

import numpy as np

from baq.models.lm import register_family
from baq.models.lm.decoder import DecoderConfig
from baq.models.lm.hf import Checkpoint, config_value, modules, nest, torch_linear, torch_norm

PREFIX = "model."
BUFFERS = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
ATTN = (("attn/q_proj", "self_attn.q_proj"), ("attn/k_proj", "self_attn.k_proj"),
        ("attn/v_proj", "self_attn.v_proj"), ("attn/o_proj", "self_attn.o_proj"))
MLP = (("mlp/gate_proj", "mlp.gate_proj"), ("mlp/up_proj", "mlp.up_proj"),
       ("mlp/down_proj", "mlp.down_proj"))
NORMS = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
DEFAULT_KV_HEADS = {"mistral": 8}  # HF's default when config.json omits it; else n_heads


def _rope(hf: dict) -> tuple[float, tuple | None]:
  """(rope_theta, DecoderConfig.rope_scaling) from either config.json generation."""
  params = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  scaling = hf.get("rope_scaling") or params
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind != "llama3":
    raise ValueError(f"{hf.get('model_type')} checkpoints with {field} of type {kind!r} are "
                     "not supported; supported: none ('default') or 'llama3'.")
  return float(theta), (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]),
                        int(scaling["original_max_position_embeddings"]))


def config_from_hf(hf: dict) -> DecoderConfig:
  """The `DecoderConfig` of a Llama / Mistral / Qwen2 config.json.

  Args:
    hf: config.json as a dict.

  Returns:
    The decoder configuration.

  Raises:
    ValueError: an unsupported activation, rope scaling or sliding-window
      layout (field named).
  """
  mt = hf.get("model_type")
  config_value(hf, "hidden_act", "silu", ("silu",))
  heads = config_value(hf, "num_attention_heads", 32)
  theta, scaling = _rope(hf)
  window, attn_bias, out_bias = None, False, False
  if mt == "mistral":
    window = config_value(hf, "sliding_window", 4096)
  elif mt == "qwen2":
    config_value(hf, "use_sliding_window", False, (False,))
    attn_bias = True
  else:
    attn_bias = out_bias = config_value(hf, "attention_bias", False)
  return DecoderConfig(
      vocab_size=config_value(hf, "vocab_size", 32000),
      d_model=config_value(hf, "hidden_size", 4096),
      n_layers=config_value(hf, "num_hidden_layers", 32), n_heads=heads,
      n_kv_heads=config_value(hf, "num_key_value_heads", None) or DEFAULT_KV_HEADS.get(mt, heads),
      head_dim=config_value(hf, "head_dim", None),
      d_ff=config_value(hf, "intermediate_size", 11008),
      max_len=config_value(hf, "max_position_embeddings", 2048), norm="rmsnorm",
      norm_eps=config_value(hf, "rms_norm_eps", 1e-6), positions="rope", rope_theta=theta,
      rope_scaling=scaling, sliding_window=window, mlp="swiglu", attn_bias=attn_bias,
      out_bias=out_bias, mlp_bias=config_value(hf, "mlp_bias", False),
      tie_embeddings=config_value(hf, "tie_word_embeddings", False))


def to_params(state_dict, cfg: DecoderConfig) -> dict:
  """Llama-layout state dict -> `CausalLM` params (numpy views where possible).

  Args:
    state_dict: HF names -> arrays.
    cfg: from `config_from_hf`.

  Returns:
    Nested params.

  Raises:
    KeyError: a key the model needs is missing.
    ValueError: a key is left unused (other than rotary buffers).
  """
  ck = Checkpoint(state_dict, PREFIX)
  p = {"embed": {"embedding": ck.take("embed_tokens.weight")},
       "final_norm": ck.norm("norm", bias=False)}
  for i in range(cfg.n_layers):
    s, o = f"layers.{i}.", f"block_{i}/"
    for ours, theirs in ATTN:
      p[o + ours] = ck.linear(s + theirs, cfg.out_bias if ours == "attn/o_proj" else cfg.attn_bias)
    for ours, theirs in MLP:
      p[o + ours] = ck.linear(s + theirs, cfg.mlp_bias)
    for ours, theirs in NORMS:
      p[o + ours] = ck.norm(s + theirs, bias=False)
  if not cfg.tie_embeddings:
    p["lm_head"] = {"kernel": ck.take("lm_head.weight").T}
  ck.finish(BUFFERS + ((r"lm_head\.weight",) if cfg.tie_embeddings else ()))
  return nest(p)


def from_params(params, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """`CausalLM` params -> the *ForCausalLM state dict ("model." names).

  Args:
    params: nested params (quantizer leaves are ignored).
    cfg: the model's configuration.

  Returns:
    HF names -> numpy arrays (lm_head.weight only when untied).
  """
  m, t = modules(params), PREFIX
  sd = {t + "embed_tokens.weight": m["embed"]["embedding"]}
  for i in range(cfg.n_layers):
    s, o = f"{t}layers.{i}.", f"block_{i}/"
    for ours, theirs in ATTN + MLP:
      sd.update(torch_linear(m[o + ours], s + theirs))
    for ours, theirs in NORMS:
      sd.update(torch_norm(m[o + ours], s + theirs))
  sd.update(torch_norm(m["final_norm"], t + "norm"))
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = m["lm_head"]["kernel"].T
  return sd


def hf_modules(cfg: DecoderConfig) -> dict[str, tuple[str, ...]]:
  """The *ForCausalLM's quantizable Linear modules -> the one baq layer each holds.

  Args:
    cfg: the model's configuration.

  Returns:
    {"model.layers.{i}.self_attn.q_proj": ("block_{i}/attn/q_proj",), ...}.
  """
  return {f"{PREFIX}layers.{i}.{theirs}": (f"block_{i}/{ours}",)
          for i in range(cfg.n_layers) for ours, theirs in ATTN + MLP}


register_family("llama", model_types=("llama", "mistral", "qwen2"), config_from_hf=config_from_hf,
                to_params=to_params, from_params=from_params, hf_modules=hf_modules)
