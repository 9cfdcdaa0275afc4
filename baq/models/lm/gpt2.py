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
"""

from __future__ import annotations

from baq.models.lm import register_family
from baq.models.lm.config import DecoderConfig
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
