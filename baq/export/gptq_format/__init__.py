"""GPTQ-format checkpoints (AutoGPTQ, GPTQModel, transformers) for baq layers.

Per quantized module M (HF name, e.g. `model.layers.0.self_attn.q_proj`) with
codes q [d_in, d_out] (torch QuantLinear's in x out, the Flax kernel layout),
zero points z and scales s [n_groups, d_out], n_groups = d_in / group_size:
  M.qweight int32 [d_in*b/32, d_out]: each run of 32 input rows becomes b
    words per column, the 32 codes laid end to end (code j at bits
    [j*b, (j+1)*b)) in one little-endian 32*b-bit stream. At 3 bits codes 10
    and 21 straddle words: AutoGPTQ's 10|1|10|1|10 loop (qlinear_cuda_old.py
    `pack`) is this stream.
  M.qzeros int32 [n_groups, d_out*b/32]: z packed the same way along d_out.
  M.scales float16 [n_groups, d_out]; M.g_idx int32 [d_in], each input row's
    group (i // group_size, or any assignment under act order, `desc_act`);
  M.bias float16 [d_out], when the layer has one;
and the weight is W[i, o] = s[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]).
Zero points, by `checkpoint_format`:
  "gptq" (v1): qzeros holds z - 1 in each field. AutoGPTQ's pack does
    `zeros -= 1`, its kernels add 1 back (triton_utils/dequant.py); most hub
    checkpoints are v1. z = 0 has no v1 encoding.
  "gptq_v2": qzeros holds z as is (GPTQModel's in-memory form).
`pack_layer` returns the v2 form, as GPTQModel's `pack` does, and the writer
shifts each decoded field. GPTQModel's legacy word constants are not used:
for 3 bits they are misaligned (the word-0 constant sets bits 2, 5, .., 29,
where word 0's fields start at 0, 3, .., 30); current GPTQModel shifts
decoded fields too (`_shift_gptq_qzeros`).
Per-module bits and group sizes live in `dynamic`, GPTQModel's syntax: regex
keys, "+:" (or none) -> override dict, "-:" -> not quantized. "-:" keys are
tried first (GPTQModel's QuantizeConfig orders them so), then the first key
whose regex `re.match`es the module name wins (`dynamic_get`).

`packing` holds the bit layout (pack, unpack, zero points); `checkpoint` the
folder (safetensors, quantize_config.json, config.json, `dynamic`).
"""

from baq.export.gptq_format.checkpoint import (dynamic_overrides, quantize_config,
                                                read_checkpoint, write_checkpoint)
from baq.export.gptq_format.packing import (ALLOWED_BITS, CHECKPOINT_FORMATS, WORD,
                                             from_symmetric, pack_layer, unpack_layer)

__all__ = ["ALLOWED_BITS", "CHECKPOINT_FORMATS", "WORD", "dynamic_overrides", "from_symmetric",
           "pack_layer", "quantize_config", "read_checkpoint", "unpack_layer",
           "write_checkpoint"]
