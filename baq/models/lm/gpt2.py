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

import numpy as np

from baq.models.lm import register_family
from baq.models.lm.decoder import DecoderConfig
from baq.models.lm.hf import Checkpoint, config_value, modules, nest, torch_linear, torch_norm

PREFIX = "transformer."
BUFFERS = (r"h\.\d+\.attn\.(bias|masked_bias)",)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}


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


def to_params(state_dict, cfg: DecoderConfig) -> dict:
  """GPT-2 state dict -> `CausalLM` params (numpy views where possible).

  Args:
    state_dict: HF names -> arrays.
    cfg: from `config_from_hf`.

  Returns:
    Nested params.

  Raises:
    KeyError: a key the model needs is missing.
    ValueError: a key is left unused (other than the mask buffers).
  """
  ck, d = Checkpoint(state_dict, PREFIX), cfg.d_model
  p = {"embed": {"embedding": ck.take("wte.weight")},
       "pos_embed": {"embedding": ck.take("wpe.weight")},
       "final_norm": ck.norm("ln_f", bias=True)}
  for i in range(cfg.n_layers):
    s, o = f"h.{i}.", f"block_{i}/"
    qkv = ck.linear(s + "attn.c_attn", bias=True, conv1d=True)
    for j, name in enumerate("qkv"):
      cols = slice(j * d, (j + 1) * d)
      p[f"{o}attn/{name}_proj"] = {"kernel": qkv["kernel"][:, cols], "bias": qkv["bias"][cols]}
    p[o + "attn/o_proj"] = ck.linear(s + "attn.c_proj", bias=True, conv1d=True)
    p[o + "attn_norm"] = ck.norm(s + "ln_1", bias=True)
    p[o + "mlp_norm"] = ck.norm(s + "ln_2", bias=True)
    p[o + "mlp/up_proj"] = ck.linear(s + "mlp.c_fc", bias=True, conv1d=True)
    p[o + "mlp/down_proj"] = ck.linear(s + "mlp.c_proj", bias=True, conv1d=True)
  if not cfg.tie_embeddings:
    p["lm_head"] = {"kernel": ck.take("lm_head.weight").T}
  # A tied head saved anyway is the embedding again.
  ck.finish(BUFFERS + ((r"lm_head\.weight",) if cfg.tie_embeddings else ()))
  return nest(p)


def from_params(params, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """`CausalLM` params -> GPT2LMHeadModel state dict ("transformer." names, no buffers).

  Args:
    params: nested params (quantizer leaves are ignored).
    cfg: the model's configuration.

  Returns:
    HF names -> numpy arrays (lm_head.weight only when untied).
  """
  m, t = modules(params), PREFIX
  sd = {t + "wte.weight": m["embed"]["embedding"], t + "wpe.weight": m["pos_embed"]["embedding"]}
  for i in range(cfg.n_layers):
    s, o = f"{t}h.{i}.", f"block_{i}/"
    sd.update(torch_norm(m[o + "attn_norm"], s + "ln_1"))
    parts = [m[f"{o}attn/{n}_proj"] for n in "qkv"]
    sd[s + "attn.c_attn.weight"] = np.concatenate([q["kernel"] for q in parts], axis=1)
    sd[s + "attn.c_attn.bias"] = np.concatenate([q["bias"] for q in parts])
    sd.update(torch_linear(m[o + "attn/o_proj"], s + "attn.c_proj", conv1d=True))
    sd.update(torch_norm(m[o + "mlp_norm"], s + "ln_2"))
    sd.update(torch_linear(m[o + "mlp/up_proj"], s + "mlp.c_fc", conv1d=True))
    sd.update(torch_linear(m[o + "mlp/down_proj"], s + "mlp.c_proj", conv1d=True))
  sd.update(torch_norm(m["final_norm"], t + "ln_f"))
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = m["lm_head"]["kernel"].T
  return sd


def hf_modules(cfg: DecoderConfig) -> dict[str, tuple[str, ...]]:
  """GPT2LMHeadModel's quantizable Conv1D modules -> the baq layers they hold.

  c_attn is one module whose columns are q | k | v, as GPTQModel and
  AutoGPTQ quantize it; every other module is one baq layer.

  Args:
    cfg: the model's configuration.

  Returns:
    {"transformer.h.{i}.attn.c_attn": ("block_{i}/attn/q_proj", ...), ...}.
  """
  out = {}
  for i in range(cfg.n_layers):
    s, o = f"{PREFIX}h.{i}.", f"block_{i}/"
    out[s + "attn.c_attn"] = tuple(f"{o}attn/{n}_proj" for n in "qkv")
    out[s + "attn.c_proj"] = (o + "attn/o_proj",)
    out[s + "mlp.c_fc"] = (o + "mlp/up_proj",)
    out[s + "mlp.c_proj"] = (o + "mlp/down_proj",)
  return out


register_family("gpt2", model_types=("gpt2",), config_from_hf=config_from_hf,
                to_params=to_params, from_params=from_params, hf_modules=hf_modules,
                hf_conv1d=True)
