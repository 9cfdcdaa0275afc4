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

Parameter paths are the contract converters and quantization rules match:
  vision/patch_embed/kernel [p, p, 3, w]     vision/class_embed [w]
  vision/pos_embed/embedding [1 + n, w]      vision/pre_norm, vision/post_norm
  text/token_embed/embedding [vocab, w]      text/pos_embed/embedding [ctx, w]
  {vision,text}/block_{i}/{attn_norm, attn/{q,k,v,o}_proj, mlp_norm, mlp/{fc1,fc2}}
  text/final_norm    visual_projection/kernel    text_projection/kernel
  logit_scale (a scalar; the logits' multiplier is its exp)
Every projection is a `Dense(quant)` and the patch embedding a `Conv(quant)`,
so a `Quantizer` rule such as "(vision|text)/block_\\d+/.*" quantizes the
blocks with no quantization code here. The towers are in `towers.py`, the
configurations in `configs.py`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from baq.models.clip.configs import CLIPConfig
from baq.models.clip.towers import TextTower, VisionTower
from baq.quant.inject import Dense, Quantizer


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  # torch's F.normalize floor: an all-zero row stays zero instead of NaN.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def logits(image_embeds: jnp.ndarray, text_embeds: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """logits_per_image [b_img, b_txt] = scale * cosine similarity of normalised embeddings."""
  return scale * image_embeds @ text_embeds.T


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
