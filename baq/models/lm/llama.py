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

The family also serves GGUF's "llama" and "qwen2" architectures
(`baq.models.lm.gguf_arch`): biases are read from which tensors the file
has, and a rotary part narrower than the head or a rope scaling (GGUF's
rope.scaling.type, Llama 3's rope_freqs tensor) is refused.
"""

from __future__ import annotations

from baq.models.lm import register_family
from baq.models.lm.config import DecoderConfig
from baq.models.lm.gguf_arch import K, Meta, f32, read_shape, refuse, register_arch, write_shape
from baq.models.lm.hf import config_value
from baq.models.lm.keys import Key, Table, converters

# RMSNorm has no bias; rotary positions have no weights (only old inv_freq buffers).
TABLE = Table(
    prefix="model.", block="layers.{i}.",
    first=(Key("embed", "embed_tokens", "embed"),),
    blocks=(Key("attn/q_proj", "self_attn.q_proj", "linear", "attn_bias"),
            Key("attn/k_proj", "self_attn.k_proj", "linear", "attn_bias"),
            Key("attn/v_proj", "self_attn.v_proj", "linear", "attn_bias"),
            Key("attn/o_proj", "self_attn.o_proj", "linear", "out_bias"),
            Key("mlp/gate_proj", "mlp.gate_proj", "linear", "mlp_bias"),
            Key("mlp/up_proj", "mlp.up_proj", "linear", "mlp_bias"),
            Key("mlp/down_proj", "mlp.down_proj", "linear", "mlp_bias"),
            Key("attn_norm", "input_layernorm", "norm", False),
            Key("mlp_norm", "post_attention_layernorm", "norm", False)),
    last=(Key("final_norm", "norm", "norm", False),),
    buffers=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
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


register_family("llama", model_types=("llama", "mistral", "qwen2"), config_from_hf=config_from_hf,
                **converters(TABLE))


def _gguf_config(meta: Meta, shapes: dict, tied: bool) -> DecoderConfig:
  """The `DecoderConfig` of a GGUF "llama" or "qwen2" file's metadata and tensor names."""
  kw = read_shape(meta, shapes)
  rope_dim = int(meta(K.Rope.DIMENSION_COUNT, kw["head_dim"]))
  if rope_dim != kw["head_dim"]:
    raise ValueError(f"GGUF {meta.arch}.rope.dimension_count={rope_dim} (rotary on part of a "
                     f"head) is not supported; it must equal the head width {kw['head_dim']}.")
  scaling = meta(K.Rope.SCALING_TYPE, "none")
  if scaling != "none":
    raise ValueError(f"GGUF {meta.arch}.rope.scaling.type={scaling!r} is not supported; "
                     "supported: 'none'.")
  return DecoderConfig(
      **kw, norm="rmsnorm", norm_eps=f32(meta(K.Attention.LAYERNORM_RMS_EPS)),
      positions="rope", rope_theta=f32(meta(K.Rope.FREQ_BASE, 10000.0)), mlp="swiglu",
      attn_bias="blk.0.attn_q.bias" in shapes, out_bias="blk.0.attn_output.bias" in shapes,
      mlp_bias="blk.0.ffn_up.bias" in shapes, tie_embeddings=tied)


def _gguf_meta(writer, cfg: DecoderConfig) -> None:
  write_shape(writer, cfg)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _hf_config(model_type: str, cfg: DecoderConfig) -> dict:
  """The config.json that `config_from_hf` reads back into `cfg` (no window, no scaling)."""
  out = {"model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
         "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
         "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
         "mlp_bias": cfg.mlp_bias, "tie_word_embeddings": cfg.tie_embeddings}
  if model_type == "llama":
    out.update(architectures=["LlamaForCausalLM"], attention_bias=cfg.attn_bias)
  else:
    out.update(architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
  return out


_ROPE_SWIGLU = dict(norm="rmsnorm", positions="rope", mlp="swiglu", rope_scaling=None,
                    sliding_window=None)
register_arch("llama", family="llama", model_type="llama", permute_qk=True,
              config_from_meta=_gguf_config, write_meta=_gguf_meta,
              hf_config=lambda cfg: _hf_config("llama", cfg),
              check=lambda cfg: refuse(cfg, "llama", **_ROPE_SWIGLU, out_bias=cfg.attn_bias))
register_arch("qwen2", family="llama", model_type="qwen2", permute_qk=False,
              config_from_meta=_gguf_config, write_meta=_gguf_meta,
              hf_config=lambda cfg: _hf_config("qwen2", cfg),
              check=lambda cfg: refuse(cfg, "qwen2", **_ROPE_SWIGLU, attn_bias=True,
                                       out_bias=False, mlp_bias=False))
