"""Published quantized-matmul numerics: LLM.int8, NF4/FP4 and torch's dynamic int8.

Each registered `Numeric` has `dot(x, w, **options)`: `x @ w` (x [..., d_in],
w [d_in, d_out], the Flax Dense layout) as that runtime computes it, and
`quantize_weight(w, **options)`: the weight as the runtime stores it,
dequantized. Integer products are exact (int8 x int8 -> int32 in
`lax.dot_general`) and every float rounding of the runtime happens here in
its dtype and order, so codes, scales and outputs are the runtime's bit for bit
on the CPU (bitsandbytes 0.50, torch 2.13; `python -m benchmarks.bnb_torch_check`),
but for nf4/fp4's float matmul, which XLA sums in its own order.

  * `llm_int8`: bitsandbytes' MatMul8bitLt (Dettmers et al. 2022): int8
    codes of the fp16-cast activations, row absmax x output-channel absmax;
    columns with an |x| >= threshold multiplied in the input's dtype.
  * `nf4` / `fp4` (weight-only, QLoRA): bitsandbytes' quantize_4bit, nearest
    code per `blocksize` weights of the torch [out, in] weight, optional
    double quantization of the absmaxes, matmul in compute_dtype.
  * `dynamic_int8`: torch.ao.nn.quantized.dynamic.Linear on fbgemm: 7-bit
    uint8 activations from the tensor's min/max, symmetric qint8 weights.
  * `q8_0`, `q5_1`, `q5_0`, `q4_1`, `q4_0`, `q6_k`, `q5_k`, `q4_k`, `q3_k`,
    `q2_k` (weight-only): llama.cpp's GGUF block formats (`ggml`), blocks
    of 32 or 256 along d_in, x @ dequant(quant(w)) in float32; rows that do
    not divide take llama.cpp's fallback type (`ggml.stored_type`).

Options are static Python values (bind them before `jax.jit`); a bad value
raises a ValueError naming the option and its bound. `ste=True` gives the
float matmul's gradient (straight-through), the forward unchanged.
`storage(d_in, d_out, **options)` is what the runtime stores for a kernel:
(bits per weight code, bits of its scales and statistics), and
`default_options()` every numeric's options at the runtime's defaults.

The runtimes live one per module (`llm_int8`, `four_bit`, `dynamic_int8`,
`ggml` with its codecs `ggml_legacy`, `ggml_kquants`, `ggml_search`);
this package registers them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

import jax

from baq.quant.numerics.dynamic_int8 import (SMALL_SCALE, WEIGHT_EPS, _dynamic_int8_dot,
                                             _dynamic_int8_storage, _dynamic_int8_weight)
from baq.quant.numerics.four_bit import (BLOCKSIZES, COMPUTE_DTYPES, DYNAMIC_CODE, FP4_CODE,
                                         NESTED_BLOCKSIZE, NF4_CODE, _four_bit_dot,
                                         _four_bit_storage, _four_bit_weight)
from baq.quant.numerics.ggml import _ggml_dot, _ggml_storage, _ggml_weight
from baq.quant.numerics.llm_int8 import (INT8_DEQUANT, LLM_INT8_THRESHOLD, MM_DEQUANT_CONST,
                                         OUTLIER_WEIGHTS, _llm_int8_dot, _llm_int8_storage,
                                         _llm_int8_weight)
from baq.registry import Registry

__all__ = ["BLOCKSIZES", "COMPUTE_DTYPES", "DYNAMIC_CODE", "FP4_CODE", "INT8_DEQUANT",
           "LLM_INT8_THRESHOLD", "MM_DEQUANT_CONST", "NESTED_BLOCKSIZE", "NF4_CODE",
           "NUMERICS", "Numeric", "OUTLIER_WEIGHTS", "SMALL_SCALE", "WEIGHT_EPS",
           "default_options"]


@dataclasses.dataclass(frozen=True)
class Numeric:
  """One runtime's quantized matmul (`baq.quant.inject` runs it for a Dense layer).

  Attributes:
    name: the registry name (`QuantSpec.numerics`).
    weight_only: True if only the weight is quantized (activations stay float).
    dot: (x [..., d_in], w [d_in, d_out], **options) -> x @ w as the runtime computes it.
    quantize_weight: (w, **options) -> w as the runtime stores it, dequantized.
    source: the published implementation transcribed.
    storage: (d_in, d_out, **options) -> (bits per weight code, bits of the
      kernel's scales and statistics), as the runtime stores it.
  """

  name: str
  weight_only: bool
  dot: Callable[..., jax.Array]
  quantize_weight: Optional[Callable[..., jax.Array]]
  source: str
  storage: Callable[..., tuple[float, float]]

  def options(self) -> dict:
    """The runtime's options of `dot` at their defaults, less `ste` (a gradient switch)."""
    params = inspect.signature(self.dot).parameters.values()
    return {p.name: p.default for p in params
            if p.kind == p.KEYWORD_ONLY and p.name != "ste"}


NUMERICS: Registry[Numeric] = Registry("quantizer numerics")


for _numeric in (
    Numeric("llm_int8", False, _llm_int8_dot, _llm_int8_weight,
            "bitsandbytes autograd/_functions.py MatMul8bitLt, nn/modules.py Linear8bitLt",
            _llm_int8_storage),
    Numeric("nf4", True, functools.partial(_four_bit_dot, "nf4"),
            functools.partial(_four_bit_weight, "nf4"),
            "bitsandbytes functional.py quantize_4bit/dequantize_4bit, Linear4bit (QLoRA)",
            functools.partial(_four_bit_storage, "nf4")),
    Numeric("fp4", True, functools.partial(_four_bit_dot, "fp4"),
            functools.partial(_four_bit_weight, "fp4"),
            "bitsandbytes functional.py quantize_4bit(quant_type='fp4'), Linear4bit",
            functools.partial(_four_bit_storage, "fp4")),
    Numeric("dynamic_int8", False, _dynamic_int8_dot, _dynamic_int8_weight,
            "torch.ao.nn.quantized.dynamic.Linear, quantized::linear_dynamic (fbgemm)",
            _dynamic_int8_storage),
    *(Numeric(t, True, functools.partial(_ggml_dot, t), functools.partial(_ggml_weight, t),
              f"llama.cpp ggml-quants.c quantize_row_{t}_ref / dequantize_row_{t}, "
              f"llama-quant.cpp tensor_type_fallback", functools.partial(_ggml_storage, t))
      for t in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k", "q4_k", "q3_k",
                "q2_k")),
):
  NUMERICS.register(_numeric.name)(_numeric)
del _numeric


def default_options() -> dict[str, dict]:
  """name -> {option: the runtime's default} of every registered numeric."""
  return {name: NUMERICS.get(name).options() for name in NUMERICS.names()}
