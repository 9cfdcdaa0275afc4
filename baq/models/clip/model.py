"""CLIP: a ViT image tower and a causal text tower embedding into one space.

Both towers are stacks of the same pre-LN block, h + attn(attn_norm(h)),
then h + mlp(mlp_norm(h)), with q/k/v/o projections that carry biases and
an fc1 -> activation -> fc2 MLP (OpenAI's quick_gelu, x * sigmoid(1.702 x),
or the exact erf GELU). The image tower embeds patches with a strided conv
(no bias), prepends the class token, adds learned positions and normalises
(HF's pre_layrnorm, OpenCLIP's ln_pre) before the blocks; the class token's
post-LN state is its feature. The text tower adds learned positions to the
token embeddings, attends causally, and takes its feature at the EOS
position after the final LN. Both features go through a bias-free projection
into the shared `embed_dim` space.

EOS position (`TextConfig.pool`): "argmax" takes the position of the
largest token id (OpenAI CLIP, OpenCLIP's default and HF for configs whose
eos_token_id is the legacy 2: CLIP's end-of-text id 49407 is the largest id
of its vocabulary); "eos" takes the first position of `eos_token_id` (HF for
any other eos_token_id, OpenCLIP's pool_type "eos"). A row without that id
pools position 0, as torch's argmax of an all-false mask does.

Parameter paths are the contract converters and quantization rules match:
  vision/patch_embed/kernel [p, p, 3, w]     vision/class_embed [w]
  vision/pos_embed/embedding [1 + n, w]      vision/pre_norm, vision/post_norm
  text/token_embed/embedding [vocab, w]      text/pos_embed/embedding [ctx, w]
  {vision,text}/block_{i}/{attn_norm, attn/{q,k,v,o}_proj, mlp_norm, mlp/{fc1,fc2}}
  text/final_norm    visual_projection/kernel    text_projection/kernel
  logit_scale (a scalar; the logits' multiplier is its exp)
Every projection is a `Dense(quant)` and the patch embedding a `Conv(quant)`,
so a `Quantizer` rule such as "(vision|text)/block_\\d+/.*" quantizes the
blocks with no quantization code here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from baq.models.lm.attention import attend, causal_mask
from baq.quant.inject import Conv, Dense, Quantizer

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: nn.gelu(x, approximate=False)}
POOLS = ("argmax", "eos")
INIT = nn.initializers.normal(0.02)


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


def _norm(eps: float, name: Optional[str] = None) -> nn.Module:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """q/k/v projections (with biases), scaled dot-product attention under `mask`, o_proj."""

  width: int
  heads: int
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    b, t, _ = x.shape
    dense = Dense(self.quant)
    q, k, v = (dense(self.width, kernel_init=INIT, name=f"{n}_proj")(x).reshape(
        b, t, self.heads, -1) for n in "qkv")
    out = attend(q, k, v, mask).reshape(b, t, self.width)
    return dense(self.width, kernel_init=INIT, name="o_proj")(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2, both with biases."""

  width: int
  mlp_dim: int
  activation: str
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = Dense(self.quant)
    h = ACTIVATIONS[self.activation](dense(self.mlp_dim, kernel_init=INIT, name="fc1")(x))
    return dense(self.width, kernel_init=INIT, name="fc2")(h)


class Block(nn.Module):
  """Pre-LN block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

  width: int
  heads: int
  mlp_dim: int
  activation: str
  norm_eps: float
  quant: Optional[Quantizer] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    a = Attention(self.width, self.heads, self.quant, name="attn")
    x = x + a(_norm(self.norm_eps, "attn_norm")(x), mask)
    mlp = Mlp(self.width, self.mlp_dim, self.activation, self.quant, name="mlp")
    return x + mlp(_norm(self.norm_eps, "mlp_norm")(x))


def _blocks(config: CLIPConfig, tower, quant: Optional[Quantizer]) -> list[Block]:
  return [Block(tower.width, tower.heads, tower.mlp_dim, config.activation, config.norm_eps, quant)
          for _ in range(tower.layers)]


def eos_positions(tokens: jnp.ndarray, text: TextConfig) -> jnp.ndarray:
  """[b] positions whose features the text tower returns (see the module docstring).

  Args:
    tokens: int [b, t].
    text: the tower's configuration (its `pool` and `eos_token_id`).

  Returns:
    int [b]: the first position of the largest id ("argmax") or of eos_token_id ("eos").
  """
  if text.pool == "argmax":
    return jnp.argmax(tokens, axis=-1)
  return jnp.argmax(tokens == text.eos_token_id, axis=-1)


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  # torch's F.normalize floor: an all-zero row stays zero instead of NaN.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def logits(image_embeds: jnp.ndarray, text_embeds: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """logits_per_image [b_img, b_txt] = scale * cosine similarity of normalised embeddings."""
  return scale * image_embeds @ text_embeds.T


class VisionTower(nn.Module):
  """Patches, class token and positions -> pre_norm -> blocks -> post_norm of the class token."""

  config: CLIPConfig
  quant: Optional[Quantizer] = None

  def setup(self):
    c, v = self.config, self.config.vision
    p = v.patch_size
    self.patch_embed = Conv(self.quant)(v.width, (p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, kernel_init=INIT)
    self.class_embed = self.param("class_embed", nn.initializers.normal(v.width**-0.5),
                                  (v.width,))
    self.pos_embed = nn.Embed(v.positions, v.width, embedding_init=INIT)
    self.pre_norm = _norm(c.norm_eps)
    self.block = _blocks(c, v, self.quant)  # block_0, block_1, ...
    self.post_norm = _norm(c.norm_eps)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    v = self.config.vision
    if images.ndim != 4 or tuple(images.shape[1:]) != (v.image_size, v.image_size, 3):
      # No position interpolation: the table holds exactly the trained grid.
      raise ValueError(f"Images must be [b, {v.image_size}, {v.image_size}, 3] (NHWC, already "
                       f"normalised) for CLIPConfig.vision.image_size={v.image_size}, got "
                       f"{tuple(images.shape)}.")
    x = self.patch_embed(images.astype(jnp.float32))
    b = x.shape[0]
    x = x.reshape(b, -1, v.width)  # row-major over the grid, as torch's flatten(2)
    cls = jnp.broadcast_to(self.class_embed, (b, 1, v.width))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed(jnp.arange(v.positions))
    x = self.pre_norm(x)
    mask = jnp.ones((1, v.positions, v.positions), bool)
    for block in self.block:
      x = block(x, mask)
    return self.post_norm(x[:, 0])


class TextTower(nn.Module):
  """Tokens and positions -> causal blocks -> final_norm, read at the EOS position."""

  config: CLIPConfig
  quant: Optional[Quantizer] = None

  def setup(self):
    c, t = self.config, self.config.text
    self.token_embed = nn.Embed(t.vocab_size, t.width, embedding_init=INIT)
    self.pos_embed = nn.Embed(t.context_length, t.width, embedding_init=INIT)
    self.block = _blocks(c, t, self.quant)
    self.final_norm = _norm(c.norm_eps)

  def __call__(self, tokens: jnp.ndarray, attention_mask: Optional[jnp.ndarray] = None):
    t = self.config.text
    b, n = tokens.shape
    if n > t.context_length:
      raise ValueError(f"{n} tokens exceed CLIPConfig.text.context_length={t.context_length}.")
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(n))
    valid = jnp.ones((1, n), bool) if attention_mask is None else attention_mask.astype(bool)
    slots = jnp.arange(n)
    mask = causal_mask(slots, slots, valid, None)
    for block in self.block:
      x = block(x, mask)
    x = self.final_norm(x)
    return x[jnp.arange(b), eos_positions(tokens, t)]


class CLIP(nn.Module):
  """Both towers, their projections and logit_scale; see the module docstring.

  Attributes:
    config: the architecture.
    quant: quantization factory, or None for the float model.
  """

  config: CLIPConfig
  quant: Optional[Quantizer] = None

  def setup(self):
    c = self.config
    self.vision = VisionTower(c, self.quant)
    self.text = TextTower(c, self.quant)
    dense = Dense(self.quant)
    self.visual_projection = dense(c.embed_dim, use_bias=False,
                                   kernel_init=nn.initializers.normal(c.vision.width**-0.5))
    self.text_projection = dense(c.embed_dim, use_bias=False,
                                 kernel_init=nn.initializers.normal(c.text.width**-0.5))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init),
                                  (), jnp.float32)

  def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
    """Unnormalised image features [b, embed_dim] of float NHWC images [b, H, W, 3]."""
    return self.visual_projection(self.vision(images))

  def encode_text(self, tokens: jnp.ndarray,
                  attention_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Unnormalised text features [b, embed_dim] of int tokens [b, t] (mask: real tokens)."""
    return self.text_projection(self.text(tokens, attention_mask))

  def __call__(self, images: jnp.ndarray, tokens: jnp.ndarray,
               attention_mask: Optional[jnp.ndarray] = None):
    """L2-normalised embeddings and the logits' multiplier.

    Args:
      images: float [b_img, H, W, 3], already normalised (CLIP's mean and std).
      tokens: int [b_txt, t], each row holding its EOS (see `TextConfig.pool`).
      attention_mask: optional [b_txt, t], False on padding keys.

    Returns:
      (image_embeds [b_img, embed_dim], text_embeds [b_txt, embed_dim],
      exp(logit_scale)); `logits(*outputs)` gives logits_per_image.
    """
    image = l2_normalize(self.encode_image(images))
    text = l2_normalize(self.encode_text(tokens, attention_mask))
    return image, text, jnp.exp(self.logit_scale)


def dummy_inputs(config: CLIPConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(one zero image, one token) that trace every parameter of `CLIP(config)`."""
  size = config.vision.image_size
  return jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, 1), jnp.int32)
