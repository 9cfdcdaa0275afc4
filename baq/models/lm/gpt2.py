"""GPT-2 checkpoints (model_type "gpt2") as a baq `CausalLM`, and back.

GPT-2 is pre-LayerNorm with learned positions 0..n_positions-1, a tanh GELU
("gelu_new") and biases everywhere. Its projections are Conv1D, which store
the weight as [in, out] (already a Flax kernel), and its attention is one
fused c_attn [d, 3d] whose columns are q | k | v; the converter splits it
into q/k/v_proj so every projection is its own quantizable layer.

HF names (with or without the "transformer." prefix of GPT2LMHeadModel):
wte, wpe, h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj},
ln_f; the head is tied to wte unless tie_word_embeddings is false. The causal
mask buffers attn.bias / attn.masked_bias of older checkpoints are skipped.

The family also serves GGUF's "gpt2" architecture (`baq.models.lm.gguf_arch`).
"""

from __future__ import annotations

from baq.models.lm import register_family
from baq.models.lm.config import DecoderConfig
from baq.models.lm.gguf_arch import K, Meta, f32, read_shape, refuse, register_arch, write_shape
from baq.models.lm.hf import config_value
from baq.models.lm.keys import Key, Table, converters

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}
# GPT-2 has biases everywhere, whatever the config says (Key's default bias=True).
TABLE = Table(
    prefix="transformer.", block="h.{i}.",
    first=(Key("embed", "wte", "embed"), Key("pos_embed", "wpe", "embed")),
    blocks=(Key("attn_norm", "ln_1", "norm"),
            Key(("attn/q_proj", "attn/k_proj", "attn/v_proj"), "attn.c_attn", "qkv"),
            Key("attn/o_proj", "attn.c_proj", "conv1d"), Key("mlp_norm", "ln_2", "norm"),
            Key("mlp/up_proj", "mlp.c_fc", "conv1d"), Key("mlp/down_proj", "mlp.c_proj", "conv1d")),
    last=(Key("final_norm", "ln_f", "norm"),),
    buffers=(r"h\.\d+\.attn\.(bias|masked_bias)",))


def config_from_hf(hf: dict) -> DecoderConfig:
  """The `DecoderConfig` of a GPT-2 config.json (HF's defaults for absent fields).

  Args:
    hf: config.json as a dict.

  Returns:
    The decoder configuration.

  Raises:
    ValueError: scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn
      true, scale_attn_weights false, or another activation (field named).
  """
  config_value(hf, "scale_attn_by_inverse_layer_idx", False, (False,))
  config_value(hf, "reorder_and_upcast_attn", False, (False,))
  config_value(hf, "scale_attn_weights", True, (True,))
  act = config_value(hf, "activation_function", "gelu_new", tuple(ACTIVATIONS))
  d = config_value(hf, "n_embd", 768)
  return DecoderConfig(
      vocab_size=config_value(hf, "vocab_size", 50257), d_model=d,
      n_layers=config_value(hf, "n_layer", 12), n_heads=config_value(hf, "n_head", 12),
      d_ff=config_value(hf, "n_inner", None) or 4 * d,
      max_len=config_value(hf, "n_positions", 1024), norm="layernorm",
      norm_eps=config_value(hf, "layer_norm_epsilon", 1e-5), positions="learned",
      mlp=ACTIVATIONS[act], attn_bias=True, out_bias=True, mlp_bias=True,
      tie_embeddings=config_value(hf, "tie_word_embeddings", True))


register_family("gpt2", model_types=("gpt2",), config_from_hf=config_from_hf,
                hf_conv1d=True, **converters(TABLE))


def _gguf_config(meta: Meta, shapes: dict, tied: bool) -> DecoderConfig:
  """The `DecoderConfig` of a GGUF "gpt2" file's metadata."""
  return DecoderConfig(**read_shape(meta, shapes), norm="layernorm",
                       norm_eps=f32(meta(K.Attention.LAYERNORM_EPS)), positions="learned",
                       mlp="gelu_tanh", attn_bias=True, out_bias=True, mlp_bias=True,
                       tie_embeddings=tied)


def _gguf_meta(writer, cfg: DecoderConfig) -> None:
  write_shape(writer, cfg)
  writer.add_layer_norm_eps(cfg.norm_eps)


def _hf_config(cfg: DecoderConfig) -> dict:
  """The config.json that `config_from_hf` reads back into `cfg`."""
  return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
          "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
          "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_len,
          "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
          "tie_word_embeddings": cfg.tie_embeddings}


def _gguf_check(cfg: DecoderConfig) -> None:
  refuse(cfg, "gpt2", norm="layernorm", positions="learned", position_offset=0, mlp="gelu_tanh",
         attn_bias=True, out_bias=True, mlp_bias=True, n_kv_heads=cfg.n_heads,
         head_dim=cfg.d_model // cfg.n_heads, sliding_window=None)


register_arch("gpt2", family="gpt2", model_type="gpt2", permute_qk=False,
              config_from_meta=_gguf_config, write_meta=_gguf_meta, hf_config=_hf_config,
              check=_gguf_check)
