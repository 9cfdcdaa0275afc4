"""`DecoderConfig`: the switches that make the one decoder (`decoder.py`) each family.

Each family module (gpt2.py, opt.py, llama.py) builds one from a checkpoint's
config; every field is checked here, and a value the decoder cannot run is
refused naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu_tanh", "gelu", "relu", "swiglu")


def _require(ok: bool, field: str, value, want: str) -> None:
  if not ok:
    raise ValueError(f"DecoderConfig.{field} must be {want}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The decoder's shape and switches (None fields resolve in __post_init__).

  Attributes:
    vocab_size: token ids are in [0, vocab_size).
    d_model: width of the residual stream.
    n_layers: decoder blocks.
    n_heads: query heads.
    d_ff: hidden width of the MLP.
    max_len: longest sequence the learned position table serves.
    n_kv_heads: key/value heads (None: n_heads); must divide n_heads.
    head_dim: per-head width (None: d_model // n_heads).
    norm: "layernorm" (weight and bias) or "rmsnorm" (weight only).
    norm_eps: epsilon of every norm.
    positions: "learned" (a table added to the embeddings) or "rope".
    position_offset: rows of the learned table before position 0 (OPT: 2).
    rope_theta: base of the rotary frequencies.
    rope_scaling: None, or Llama 3's (factor, low_freq_factor,
      high_freq_factor, original_max_position_embeddings).
    sliding_window: None, or how many keys (the query's own included) a
      query sees (Mistral).
    mlp: "gelu_tanh" (GPT-2's gelu_new), "gelu", "relu" (OPT) or "swiglu".
    attn_bias: q/k/v projections carry a bias.
    out_bias: the attention output projection carries a bias.
    mlp_bias: the MLP projections carry a bias.
    tie_embeddings: logits from the token embedding (no lm_head).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_len: int = 2048
  n_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  positions: str = "rope"
  position_offset: int = 0
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple[float, float, float, int]] = None
  sliding_window: Optional[int] = None
  mlp: str = "swiglu"
  attn_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = False

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      value = getattr(self, field)
      _require(isinstance(value, (int, np.integer)) and value >= 1, field, value, "an int >= 1")
    if self.head_dim is None:
      _require(self.d_model % self.n_heads == 0, "d_model", self.d_model,
               f"a multiple of n_heads={self.n_heads} when head_dim is None")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    h, kv, scaling = self.n_heads, self.n_kv_heads, self.rope_scaling
    checks = (
        ("n_kv_heads", 1 <= kv <= h and h % kv == 0, f"in [1, n_heads={h}] and divide it"),
        ("head_dim", self.head_dim >= 1 and (self.positions != "rope" or self.head_dim % 2 == 0),
         ">= 1 (and even for rope)"),
        ("norm", self.norm in NORMS, f"one of {', '.join(NORMS)}"),
        ("positions", self.positions in POSITIONS, f"one of {', '.join(POSITIONS)}"),
        ("mlp", self.mlp in MLPS, f"one of {', '.join(MLPS)}"),
        ("norm_eps", self.norm_eps > 0, "> 0"),
        ("position_offset", self.position_offset >= 0, ">= 0"),
        ("rope_theta", self.rope_theta > 0, "> 0"),
        ("sliding_window", self.sliding_window is None or self.sliding_window >= 1,
         "None or >= 1"),
        ("rope_scaling", scaling is None or (len(scaling) == 4 and min(scaling) > 0
                                             and scaling[1] < scaling[2]),
         "None or (factor, low_freq_factor, high_freq_factor, original_max_len), all > 0, "
         "low < high"))
    for field, ok, want in checks:
      _require(ok, field, getattr(self, field), want)
