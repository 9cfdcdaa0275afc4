"""OPT checkpoints (model_type "opt") as a baq `CausalLM`, and back.

OPT is pre-LayerNorm with ReLU and biased torch Linear layers. Its learned
position table has two extra rows in front (HF's OPTLearnedPositionalEmbedding
offset): position p reads row p + 2, so `position_offset=2`, and positions
come from the attention mask (cumsum(mask) * mask - 1), which the decoder
does whenever a mask is given.

HF names (with or without OPTForCausalLM's "model." prefix):
decoder.embed_tokens, decoder.embed_positions [max_pos + 2, d],
decoder.layers.{i}.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1,
fc2, final_layer_norm}, decoder.final_layer_norm, and lm_head unless tied.

Refused (field named): do_layer_norm_before=false (OPT-350m's post-norm),
word_embed_proj_dim != hidden_size (its projections in and out of the
embedding), _remove_final_layer_norm and layer_norm_elementwise_affine=false.
"""

from __future__ import annotations

from baq.models.lm import register_family
from baq.models.lm.config import DecoderConfig
from baq.models.lm.hf import config_value
from baq.models.lm.keys import Key, Table, converters

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
# enable_bias sets attn_bias, out_bias and mlp_bias alike; every Linear reads attn_bias.
TABLE = Table(
    prefix="model.", block="decoder.layers.{i}.",
    first=(Key("embed", "decoder.embed_tokens", "embed"),
           Key("pos_embed", "decoder.embed_positions", "embed")),
    blocks=(Key("attn/q_proj", "self_attn.q_proj", "linear", "attn_bias"),
            Key("attn/k_proj", "self_attn.k_proj", "linear", "attn_bias"),
            Key("attn/v_proj", "self_attn.v_proj", "linear", "attn_bias"),
            Key("attn/o_proj", "self_attn.out_proj", "linear", "attn_bias"),
            Key("mlp/up_proj", "fc1", "linear", "attn_bias"),
            Key("mlp/down_proj", "fc2", "linear", "attn_bias"),
            Key("attn_norm", "self_attn_layer_norm", "norm"),
            Key("mlp_norm", "final_layer_norm", "norm")),
    last=(Key("final_norm", "decoder.final_layer_norm", "norm"),))


def config_from_hf(hf: dict) -> DecoderConfig:
  """The `DecoderConfig` of an OPT config.json (HF's defaults for absent fields).

  Args:
    hf: config.json as a dict.

  Returns:
    The decoder configuration.

  Raises:
    ValueError: an unsupported variant (see the module docstring), field named.
  """
  d = config_value(hf, "hidden_size", 768)
  config_value(hf, "do_layer_norm_before", True, (True,))
  config_value(hf, "word_embed_proj_dim", d, (d,))
  config_value(hf, "_remove_final_layer_norm", False, (False,))
  config_value(hf, "layer_norm_elementwise_affine", True, (True,))
  act = config_value(hf, "activation_function", "relu", tuple(ACTIVATIONS))
  bias = config_value(hf, "enable_bias", True)
  return DecoderConfig(
      vocab_size=config_value(hf, "vocab_size", 50272), d_model=d,
      n_layers=config_value(hf, "num_hidden_layers", 12),
      n_heads=config_value(hf, "num_attention_heads", 12),
      d_ff=config_value(hf, "ffn_dim", 3072),
      max_len=config_value(hf, "max_position_embeddings", 2048), norm="layernorm",
      norm_eps=1e-5, positions="learned", position_offset=2, mlp=ACTIVATIONS[act],
      attn_bias=bias, out_bias=bias, mlp_bias=bias,
      tie_embeddings=config_value(hf, "tie_word_embeddings", True))


register_family("opt", model_types=("opt",), config_from_hf=config_from_hf,
                **converters(TABLE))
