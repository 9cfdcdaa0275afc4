r"""baq's quantized stories260K as block-quantized GGUF files, run by llama.cpp itself.

Quantizes the stories260K Llama with the LM study's own functions
(`configs/lm.py:stories`: its calibration text and a seeded sample of its
StereoSet pairs, `--pairs`, for Fair-GPTQ and the mixed allocation's importance;
`baq.study.lm.quant.quantize`) at several settings, writes each with
`baq.export.gguf_quant.export_gguf`, and runs the file in llama.cpp
(llama-cpp-python, float32 KV cache as in gguf_llama_cpp_check.py). Printed
per setting: the tensor types and how many are exact (`gguf.quants`
dequantization equal to baq's weights bit for bit), the largest relative
weight error of the inexact ones, then over the same tokens of the held-out
text: max |llama.cpp - baq| of the logits (also over the std of baq's),
argmax agreement, and the perplexity of baq's quantized model, of baq's
reader on the written file, and of llama.cpp on it. llama.cpp's CPU matmul
quantizes the activations to 8 bits for q4_0 / q8_0 weights (baq's
dequantized-weight model does not), so its logits differ slightly even
where the weights are exact; the control runs baq's dequantized weights
as an F32 file in llama.cpp, where its matmuls are float. The held-out text
is also the calibration text here (the stories config's data.heldout).

  pip install llama-cpp-python   # builds llama.cpp: minutes on 2 cores
  python benchmarks/gguf_export_check.py [--windows=8] [--tokens=256] [--pairs=256]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import jax
import numpy as np

from baq.data.text.tokenizer import special_ids
from baq.export.gguf_lm import write_gguf
from baq.export.gguf_quant import export_gguf
from baq.models.lm import LM_FAMILIES
from baq.models.lm.gguf import load_gguf
from baq.ptq import decoder as gd
from baq.study.lm import quant as lm_quant, study
from configs import lm as lm_config

# name -> (study setting, quant.scale_dtype, export_gguf options)
SETTINGS = {
    "gptq@4": ("gptq@4", "float16", {}),
    "gptq@4, f32 fallback": ("gptq@4", "float16", dict(fallback="f32")),
    "fair_gptq@4:a0.1": ("fair_gptq@4:a0.1", "float16", {}),
    "mixed@3": ("mixed@3", "float16", {}),
    "gptq@4, float32 scales": ("gptq@4", "float32", {}),
    "gptq@2 as q2_k": ("gptq@2", "float16", dict(bit_types={2: "q2_k"})),
}


def llama_cpp_logits(path: str, windows: np.ndarray) -> np.ndarray:
  from llama_cpp import Llama  # pylint: disable=import-outside-toplevel
  llm = Llama(model_path=path, logits_all=True, n_ctx=max(512, windows.shape[1] + 8),
              n_threads=2, type_k=0, type_v=0, verbose=False)
  out = []
  for ids in windows:
    llm.reset()
    llm.eval(ids.tolist())
    out.append(np.array(llm.scores[:len(ids)], np.float32))
  return np.stack(out)


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
  """exp(mean next-token negative log-likelihood) over every window."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(np.float32))
  nll = -np.take_along_axis(np.asarray(logp), windows[:, 1:, None], -1)
  return float(np.exp(nll.mean()))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--windows", type=int, default=8, help="windows of held-out tokens")
  p.add_argument("--tokens", type=int, default=256, help="tokens per window (BOS first)")
  p.add_argument("--pairs", type=int, default=256,
                 help="StereoSet pairs (a seeded sample) for Fair-GPTQ and the importance")
  p.add_argument("--only", default="", help="comma-separated SETTINGS names (default: all)")
  args = p.parse_args(argv)
  config = lm_config.get_config("stories")
  config.export = "gguf"
  texts = study.load_texts(config, "")
  with tempfile.TemporaryDirectory() as tmp:
    built = study.build_model(config, texts, tmp, 0)
    model, params, tok = built["model"], built["params"], built["tokenizer"]
    bos = special_ids(tok)["bos"]
    ids = [i for i in tok.encode(" ".join(texts["heldout"])).ids if i != bos]
    n = args.tokens - 1  # each window starts with BOS
    windows = np.asarray([[bos] + ids[i * n:(i + 1) * n] for i in range(args.windows)],
                         np.int32)
    apply = jax.jit(model.apply)
    fp = np.asarray(apply({"params": params}, windows))
    fp_cpp = llama_cpp_logits(config.model.gguf_file, windows)
    print(f"stories260K, {args.windows} x {args.tokens} held-out tokens; float model: "
          f"perplexity baq {perplexity(fp, windows):.4f}, llama.cpp {perplexity(fp_cpp, windows):.4f}, "
          f"max |logit diff| {np.abs(fp - fp_cpp).max():.3g}")
    calib = study.calibration(config, texts, tok, 0)
    keep = np.sort(np.random.default_rng(0).permutation(len(calib.pair_bias_type))[:args.pairs])
    calib = dataclasses.replace(calib, pair_bias_type=calib.pair_bias_type[keep], pairs=tuple(
        gd.Tokens(t.ids[keep], t.lengths[keep]) for t in calib.pairs))
    modules = list(LM_FAMILIES.get(built["family"]).hf_modules(model.config).values())
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SETTINGS)
    for name in only:
      setting, scale_dtype, options = SETTINGS[name]
      config.quant.scale_dtype = scale_dtype
      q, records, _ = lm_quant.quantize(setting, model, params, calib, config,
                                        model.config.n_layers, modules)
      path = os.path.join(tmp, name.replace(" ", "_").replace(",", "") + ".gguf")
      rec = export_gguf(path, built["family"], model.config, q, records, tok, verbose=False,
                        **options)
      t = rec["tensors"].values()
      types = {k: sum(r["type"] == k for r in t) for k in sorted({r["type"] for r in t})}
      inexact = [r for r in t if not r["exact"]]
      ours = np.asarray(apply({"params": q}, windows))
      m2, v2, _, _ = load_gguf(path)
      read = np.asarray(jax.jit(m2.apply)(v2, windows))
      cpp = llama_cpp_logits(path, windows)
      # Control: the same dequantized weights as an F32 file, so llama.cpp's matmuls are float.
      ctrl = llama_cpp_logits(write_gguf(path[:-len(".gguf")] + "_f32.gguf", model.config, q,
                                         built["family"], tok), windows)
      diff = np.abs(cpp - ours).max()
      print(f"{name}: {os.path.getsize(path)} bytes, types {types}, exact "
            f"{len(t) - len(inexact)}/{len(t)}"
            + (f" (inexact: largest relative weight error "
               f"{max(r['rel_error'] for r in inexact):.3g}, "
               f"{sorted({r['path'] for r in inexact})})" if inexact else ""))
      print(f"  logits: max |llama.cpp - baq| {diff:.3g} ({diff / ours.std():.3g} of baq's std), "
            f"argmax agreement {np.mean(cpp.argmax(-1) == ours.argmax(-1)):.4f}; "
            f"baq's reader of the file vs baq: max |diff| {np.abs(read - ours).max():.3g}")
      print(f"  perplexity: baq {perplexity(ours, windows):.4f}, baq's reader of the file "
            f"{perplexity(read, windows):.4f}, llama.cpp {perplexity(cpp, windows):.4f}")
      print(f"  control, baq's weights as an F32 file in llama.cpp: max |logit diff| "
            f"{np.abs(ctrl - ours).max():.3g}, perplexity {perplexity(ctrl, windows):.4f}")


if __name__ == "__main__":
  main()
