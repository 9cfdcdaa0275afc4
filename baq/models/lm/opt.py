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

import numpy as np

from baq.models.lm import register_family
from baq.models.lm.decoder import DecoderConfig
from baq.models.lm.hf import Checkpoint, config_value, modules, nest, torch_linear, torch_norm

PREFIX = "model."
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
# The baq layer, and OPT's name for it, in each decoder layer.
LAYERS = (("attn/q_proj", "self_attn.q_proj"), ("attn/k_proj", "self_attn.k_proj"),
          ("attn/v_proj", "self_attn.v_proj"), ("attn/o_proj", "self_attn.out_proj"),
          ("mlp/up_proj", "fc1"), ("mlp/down_proj", "fc2"))
NORMS = (("attn_norm", "self_attn_layer_norm"), ("mlp_norm", "final_layer_norm"))


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


def to_params(state_dict, cfg: DecoderConfig) -> dict:
  """OPT state dict -> `CausalLM` params (numpy views where possible).

  Args:
    state_dict: HF names -> arrays.
    cfg: from `config_from_hf`.

  Returns:
    Nested params.

  Raises:
    KeyError: a key the model needs is missing.
    ValueError: a key is left unused.
  """
  ck, bias = Checkpoint(state_dict, PREFIX), cfg.attn_bias
  p = {"embed": {"embedding": ck.take("decoder.embed_tokens.weight")},
       "pos_embed": {"embedding": ck.take("decoder.embed_positions.weight")},
       "final_norm": ck.norm("decoder.final_layer_norm", bias=True)}
  for i in range(cfg.n_layers):
    s, o = f"decoder.layers.{i}.", f"block_{i}/"
    for ours, theirs in LAYERS:
      p[o + ours] = ck.linear(s + theirs, bias=bias)
    for ours, theirs in NORMS:
      p[o + ours] = ck.norm(s + theirs, bias=True)
  if not cfg.tie_embeddings:
    p["lm_head"] = {"kernel": ck.take("lm_head.weight").T}
  ck.finish((r"lm_head\.weight",) if cfg.tie_embeddings else ())  # a tied head is wte again
  return nest(p)


def from_params(params, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """`CausalLM` params -> OPTForCausalLM state dict ("model." names).

  Args:
    params: nested params (quantizer leaves are ignored).
    cfg: the model's configuration.

  Returns:
    HF names -> numpy arrays (lm_head.weight only when untied).
  """
  m, t = modules(params), PREFIX + "decoder."
  sd = {t + "embed_tokens.weight": m["embed"]["embedding"],
        t + "embed_positions.weight": m["pos_embed"]["embedding"]}
  for i in range(cfg.n_layers):
    s, o = f"{t}layers.{i}.", f"block_{i}/"
    for ours, theirs in LAYERS:
      sd.update(torch_linear(m[o + ours], s + theirs))
    for ours, theirs in NORMS:
      sd.update(torch_norm(m[o + ours], s + theirs))
  sd.update(torch_norm(m["final_norm"], t + "final_layer_norm"))
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = m["lm_head"]["kernel"].T
  return sd


def hf_modules(cfg: DecoderConfig) -> dict[str, tuple[str, ...]]:
  """OPTForCausalLM's quantizable Linear modules -> the one baq layer each holds.

  Args:
    cfg: the model's configuration.

  Returns:
    {"model.decoder.layers.{i}.self_attn.q_proj": ("block_{i}/attn/q_proj",), ...}.
  """
  return {f"{PREFIX}decoder.layers.{i}.{theirs}": (f"block_{i}/{ours}",)
          for i in range(cfg.n_layers) for ours, theirs in LAYERS}


register_family("opt", model_types=("opt",), config_from_hf=config_from_hf,
                to_params=to_params, from_params=from_params, hf_modules=hf_modules)
