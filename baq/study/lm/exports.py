"""The LM study's exports of each quantized setting (`config.export`).

  gptq   a GPTQ-format checkpoint folder, WORKDIR/seed<S>/gptq/<setting>
         (`baq.export.gptq_lm`)
  gguf   a block-quantized GGUF file for llama.cpp,
         WORKDIR/seed<S>/gguf/<setting>.gguf (`baq.export.gguf_quant`):
         baq's codes written as they are where a ggml type holds them
         (q4_0 for 2-4 bits, q5_0, q8_0 for 6-8 bits); per-tensor record in
         the setting's results JSON (info.gguf)

An entry also names the scale dtype its format holds exactly, which the
quantizer uses when `quant.scale_dtype` is "auto" (`scale_dtype`).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, NamedTuple

from baq import launch
from baq import workdir as wd
from baq.data.text.tokenizer import special_ids
from baq.export import gguf_quant, gptq_lm
from baq.models.lm.gguf_arch import GGUF_ARCHS
from baq.models.lm.gguf_tokenizer import meta_from_tokenizer
from baq.quant.gptq import SCALE_DTYPES
from baq.registry import Registry


class Export(NamedTuple):
  """One export format.

  Attributes:
    write: (out, family, model config, float params, quantized params,
      per-layer records, the built model's dict, config) -> a record for the
      setting's info (or None); `out` is the path without `suffix`.
    suffix: "" for a folder, else the file's extension.
    scale_dtype: the scales the format holds exactly ("auto" resolves to it).
  """
  write: Callable[..., Any]
  suffix: str
  scale_dtype: str


EXPORTS: Registry[Export] = Registry("LM study export format")


def _gptq(out: str, family, cfg, params, qparams, records: dict, built: dict, config) -> None:
  gptq_lm.export_gptq(out, family, cfg, params, qparams, records, built["hf_config"],
                      group_size=config.quant.group_size, tokenizer=built["tokenizer"])


def _gguf(out: str, family, cfg, params, qparams, records: dict, built: dict, config) -> dict:
  tokenizer = built["tokenizer"]
  try:  # a word-level tokenizer (the synthetic data's) has no GGUF form
    if tokenizer is not None:
      meta_from_tokenizer(tokenizer, special_ids(tokenizer))
  except ValueError as e:
    print(f"[gguf] {out}.gguf has no vocabulary (llama.cpp needs one to run it): {e}",
          flush=True)
    tokenizer = None
  model_type = built["hf_config"].get("model_type")
  arch = model_type if model_type in GGUF_ARCHS.names() else None  # qwen2: a llama family
  rec = gguf_quant.export_gguf(out + ".gguf", built["family"], cfg, qparams, records, tokenizer,
                               group_size=config.quant.group_size, arch=arch)
  return {"exact": rec["exact"],
          "tensors": {n: {k: v for k, v in t.items() if k != "layers"}
                      for n, t in rec["tensors"].items()}}


EXPORTS.register("gptq")(Export(_gptq, "", "float32"))
EXPORTS.register("gguf")(Export(_gguf, ".gguf", gguf_quant.SCALE_DTYPE))


def scale_dtype(config) -> str:
  """The quantizer's scale dtype: `quant.scale_dtype`, or for "auto" the export's.

  Raises:
    ValueError: an unknown quant.scale_dtype (the valid ones listed).
  """
  want = config.quant.get("scale_dtype", "auto")
  if want == "auto":
    return EXPORTS.get(config.export).scale_dtype if config.export else "float32"
  if want not in SCALE_DTYPES:
    raise ValueError(f"quant.scale_dtype must be auto or one of {', '.join(SCALE_DTYPES)}, "
                     f"got {want!r}.")
  return want


def export(config, seed_dir: str, name: str, family, cfg, params, qparams, records: dict,
           built: dict) -> tuple[str, Any]:
  """Writes setting `name`'s export (process 0; a partial one of an interrupted run is
  replaced).

  Returns:
    (the export's path, its record or None).
  """
  fmt = EXPORTS.get(config.export)
  out = wd.path(seed_dir, config.export, name.replace(":", "_"))  # one per setting
  record = None
  if launch.is_primary():  # one writer of shared files
    if os.path.isdir(out + fmt.suffix):
      shutil.rmtree(out + fmt.suffix)
    record = fmt.write(out, family, cfg, params, qparams, records, built, config)
  return out + fmt.suffix, record
