"""CLIP's configuration, and how it is read from Hugging Face and OpenCLIP files.

`CLIPConfig` (with its `VisionConfig` and `TextConfig`) is the architecture
`model.CLIP` builds; each refuses, naming the field, a value the model cannot
build. `config_from_hf` reads a Hugging Face CLIP config.json (vision_config,
text_config, projection_dim); `config_from_open_clip` an OpenCLIP model
config (embed_dim, vision_cfg, text_cfg, quick_gelu). Whatever the Flax
model does not compute is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: nn.gelu(x, approximate=False)}
POOLS = ("argmax", "eos")


def _require(ok: bool, field: str, value, want: str) -> None:
  if not ok:
    raise ValueError(f"CLIPConfig.{field} must be {want}, got {value!r}.")


def _positive_ints(prefix: str, obj, fields) -> None:
  for field in fields:
    value = getattr(obj, field)
    _require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
             prefix + field, value, "an int >= 1")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The image tower (defaults: ViT-B/32 at 224 px).

  Attributes:
    image_size: square input side; a multiple of patch_size.
    patch_size: side of the square patches (the conv's kernel and stride).
    width: token width; a multiple of heads.
    layers: transformer blocks.
    heads: attention heads.
    mlp_dim: hidden width of the MLP.
  """

  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072

  def __post_init__(self):
    _positive_ints("vision.", self, ("image_size", "patch_size", "width", "layers", "heads",
                                     "mlp_dim"))
    _require(self.image_size % self.patch_size == 0, "vision.image_size", self.image_size,
             f"a multiple of patch_size={self.patch_size}")
    _require(self.width % self.heads == 0, "vision.width", self.width,
             f"a multiple of heads={self.heads}")

  @property
  def positions(self) -> int:
    return 1 + (self.image_size // self.patch_size)**2  # the class token and the patches


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text tower (defaults: CLIP's 77-token, 49408-id tower of ViT-B/32).

  Attributes:
    vocab_size: token ids are in [0, vocab_size).
    context_length: rows of the position table (the longest input).
    width: token width; a multiple of heads.
    layers: transformer blocks.
    heads: attention heads.
    mlp_dim: hidden width of the MLP.
    pool: "argmax" (the largest id's position) or "eos" (eos_token_id's first).
    eos_token_id: the id "eos" pooling looks for; required by it.
  """

  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  pool: str = "argmax"
  eos_token_id: Optional[int] = None

  def __post_init__(self):
    _positive_ints("text.", self, ("vocab_size", "context_length", "width", "layers", "heads",
                                   "mlp_dim"))
    _require(self.width % self.heads == 0, "text.width", self.width,
             f"a multiple of heads={self.heads}")
    _require(self.pool in POOLS, "text.pool", self.pool, f"one of {', '.join(POOLS)}")
    eos = self.eos_token_id
    _require(self.pool != "eos" or (isinstance(eos, (int, np.integer))
                                    and 0 <= eos < self.vocab_size),
             "text.eos_token_id", eos, f"an id in [0, vocab_size={self.vocab_size}) for eos "
             "pooling")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """The whole model; `CLIPConfig()` is OpenAI's ViT-B/32.

  Attributes:
    vision: the image tower.
    text: the text tower.
    embed_dim: width of the shared embedding space (both projections' output).
    activation: the MLPs' "quick_gelu" (OpenAI) or "gelu" (erf; most OpenCLIP runs).
    norm_eps: epsilon of every LayerNorm.
    logit_scale_init: initial logit_scale (log 1/0.07, CLIP's), when not loaded.
  """

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  embed_dim: int = 512
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  logit_scale_init: float = math.log(1 / 0.07)

  def __post_init__(self):
    _require(isinstance(self.vision, VisionConfig), "vision", self.vision, "a VisionConfig")
    _require(isinstance(self.text, TextConfig), "text", self.text, "a TextConfig")
    _positive_ints("", self, ("embed_dim",))
    _require(self.activation in ACTIVATIONS, "activation", self.activation,
             f"one of {', '.join(ACTIVATIONS)}")
    _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "> 0")


def _get(section: Mapping[str, Any], where: str, field: str, default, supported=None):
  value = section.get(field, default)
  if supported is not None and value not in supported:
    raise ValueError(f"{where}{field}={value!r} is not supported; supported: "
                     f"{', '.join(map(repr, supported))}.")
  return value


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
  """The `CLIPConfig` of a Hugging Face CLIP config.json (HF's defaults for absent fields).

  The text feature's position follows HF's rule: the argmax of the ids when
  text_config.eos_token_id is the legacy 2 of OpenAI's files (or null), else
  the first eos_token_id (transformers since PR #24773). A recent revision
  tests the ids instead (argmax when every row's largest id is 49407, else
  the first eos_token_id): the same positions for CLIP-tokenized input,
  whose end-of-text 49407 is the vocabulary's largest id.

  Raises:
    ValueError: naming the field: a model_type other than "clip", an
      activation other than quick_gelu / gelu, towers with different
      activations or epsilons, or num_channels other than 3.
  """
  _get(hf, "config.json ", "model_type", None, ("clip",))
  # Older files may carry *_config_dict, which HF lays over *_config.
  vis = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
  txt = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
  wv, wt = "config.json vision_config.", "config.json text_config."
  act = _get(vis, wv, "hidden_act", "quick_gelu", ("quick_gelu", "gelu"))
  _get(txt, wt, "hidden_act", "quick_gelu", (act,))  # CLIPConfig has one activation
  eps = _get(vis, wv, "layer_norm_eps", 1e-5)
  _get(txt, wt, "layer_norm_eps", 1e-5, (eps,))
  _get(vis, wv, "num_channels", 3, (3,))
  eos = txt.get("eos_token_id", 49407)
  pool = dict(pool="argmax") if eos in (2, None) else dict(pool="eos", eos_token_id=eos)
  vision = VisionConfig(
      image_size=vis.get("image_size", 224), patch_size=vis.get("patch_size", 32),
      width=vis.get("hidden_size", 768), layers=vis.get("num_hidden_layers", 12),
      heads=vis.get("num_attention_heads", 12), mlp_dim=vis.get("intermediate_size", 3072))
  text = TextConfig(
      vocab_size=txt.get("vocab_size", 49408),
      context_length=txt.get("max_position_embeddings", 77),
      width=txt.get("hidden_size", 512), layers=txt.get("num_hidden_layers", 12),
      heads=txt.get("num_attention_heads", 8), mlp_dim=txt.get("intermediate_size", 2048), **pool)
  return CLIPConfig(vision, text, embed_dim=hf.get("projection_dim", 512), activation=act,
                    norm_eps=eps, logit_scale_init=hf.get("logit_scale_init_value", 2.6592))


_BLOCK_OPTIONS = {"ls_init_value": (None,), "act_kwargs": (None,), "block_type": (None, "default"),
                  **{f: (False,) for f in ("qk_norm", "scaled_cosine_attn", "scale_heads",
                                           "scale_attn_inner", "scale_attn", "scale_fc")}}
# Per section: the fields read, those refused unless at the listed values, and those
# that cannot change a ViT/text tower's forward (tokenizer, training-only, other towers').
OPEN_CLIP_FIELDS = {
    "": ({"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"},
         {"custom_text": (False,), "init_logit_bias": (None,)}, set()),
    "vision_cfg.": (
        {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "norm_kwargs"},
        {"timm_model_name": (None, ""), "attentional_pool": (False,), "no_ln_pre": (False,),
         "pos_embed_type": ("learnable",), "pool_type": ("tok",), **_BLOCK_OPTIONS},
        {"patch_dropout", "output_tokens", "image_seq_len", "final_ln_after_pool",
         "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
         "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "timm_model_kwargs"}),
    "text_cfg.": (
        {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type",
         "eos_id", "norm_kwargs"},
        {"text_arch": ("clip",), "hf_model_name": (None, ""), "embed_cls": (False,),
         "no_causal_mask": (False,), "proj_bias": (False,), "proj_type": ("linear",),
         "variable_text": (False,), **_BLOCK_OPTIONS},
        {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "tokenizer_type",
         "tiktoken_name", "pad_id", "bos_id", "output_tokens", "final_ln_after_pool",
         "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "hf_model_config",
         # the "modern" text arch's options, unused by the "clip" arch
         "attention_mode", "pos_embed", "rope_temperature", "mlp_type", "norm_type", "norm_eps",
         "attn_gated", "pre_norm", "norm_placement", "zero_init_residual", "reg_tokens",
         "value_residual", "attention_bias", "mlp_bias", "gate_bias"}),
}


def _check_open_clip_section(section: Mapping[str, Any], where: str) -> float:
  """Refuses unsupported or unknown fields of one section; returns its LayerNorm eps."""
  read, only, harmless = OPEN_CLIP_FIELDS[where]
  for field in section:
    if field in only:
      _get(section, "OpenCLIP config " + where, field, None, only[field])
    elif field not in read | harmless:
      raise ValueError(f"OpenCLIP config field {where}{field} is unknown to baq's CLIP "
                       f"converter; refused rather than ignored.")
  norm = section.get("norm_kwargs") or {}
  if set(norm) - {"eps"}:
    raise ValueError(f"OpenCLIP config {where}norm_kwargs={norm!r} is not supported (only eps).")
  return norm.get("eps", 1e-5)


def _square(section: Mapping[str, Any], where: str, field: str, default) -> int:
  value = section.get(field, default)
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"OpenCLIP config {where}{field}={value!r} is not supported (square only).")
    value = value[0]
  return value


def config_from_open_clip(oc: Mapping[str, Any]) -> CLIPConfig:
  """The `CLIPConfig` of an OpenCLIP model config (ViT-B-32.json; OpenCLIP's defaults).

  Only native ViT image towers and CLIP text towers: a ResNet (list `layers`),
  timm or attentional-pool image tower, an HF or "modern" text tower, CoCa's
  class token, SigLIP's logit bias and every other option that changes the
  forward is refused, naming the field; so is a field the converter does not
  know. Training-only options (patch_dropout) and tokenizer fields are ignored.

  Raises:
    ValueError: naming the unsupported or unknown field.
  """
  vis, txt = oc.get("vision_cfg") or {}, oc.get("text_cfg") or {}
  _check_open_clip_section(oc, "")
  eps = _check_open_clip_section(vis, "vision_cfg.")
  if _check_open_clip_section(txt, "text_cfg.") != eps:
    raise ValueError(f"OpenCLIP config text_cfg.norm_kwargs.eps must equal the vision tower's "
                     f"{eps} (one norm_eps), got {txt['norm_kwargs']['eps']!r}.")
  if isinstance(vis.get("layers", 12), (list, tuple)):
    raise ValueError(f"OpenCLIP config vision_cfg.layers={vis['layers']!r} is a ModifiedResNet "
                     f"image tower; only ViT towers are supported.")
  pool = _get(txt, "OpenCLIP config text_cfg.", "pool_type", "argmax", ("argmax", "eos"))
  if pool == "eos" and txt.get("eos_id") is None:
    raise ValueError("OpenCLIP config text_cfg.pool_type='eos' needs text_cfg.eos_id.")
  width, twidth = vis.get("width", 768), txt.get("width", 512)
  vision = VisionConfig(
      image_size=_square(vis, "vision_cfg.", "image_size", 224),
      patch_size=_square(vis, "vision_cfg.", "patch_size", 16), width=width,
      layers=vis.get("layers", 12), heads=width // vis.get("head_width", 64),
      mlp_dim=int(width * vis.get("mlp_ratio", 4.0)))  # OpenCLIP's int(width * mlp_ratio)
  text = TextConfig(
      vocab_size=txt.get("vocab_size", 49408), context_length=txt.get("context_length", 77),
      width=twidth, layers=txt.get("layers", 12), heads=txt.get("heads", 8),
      mlp_dim=int(twidth * txt.get("mlp_ratio", 4.0)), pool=pool,
      eos_token_id=txt.get("eos_id") if pool == "eos" else None)
  return CLIPConfig(vision, text, embed_dim=oc.get("embed_dim", 512),
                    activation="quick_gelu" if oc.get("quick_gelu", False) else "gelu",
                    norm_eps=eps, logit_scale_init=math.log(1 / 0.07))
