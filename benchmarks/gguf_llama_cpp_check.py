r"""GGUF files baq writes (`baq.export.gguf_lm.write_gguf`), run by llama.cpp itself.

Reads a GGUF model with baq (`load_gguf`), writes it back with baq's writer
(F32; F16; and F32 with every tensor whose rows hold whole 32-value blocks
given as Q8_0 blocks through `overrides`), and runs each file, and the
original, in llama.cpp (llama-cpp-python). Printed per file: whether
llama.cpp's tokenizer gives the ids baq's gives (the whole text, and each
line), max |llama.cpp - baq| of the logits over a prefix of the text (also
over the std of baq's logits) and argmax agreement, against baq's logits of
the file it wrote (for Q8_0: baq's dequantization of the same blocks;
llama.cpp also quantizes the activations to 8 bits in those matmuls), and
llama.cpp's greedy continuation of BOS.

  pip install llama-cpp-python   # builds llama.cpp: minutes on 2 cores
  python benchmarks/gguf_llama_cpp_check.py [--gguf=../shared/data/lm/stories260K.gguf] \
      [--text=../shared/data/lm/tinystories_valid_sample.txt] [--tokens=256] [--new=64]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import gguf
import jax
import numpy as np

from baq.export.gguf_lm import write_gguf
from baq.models.lm.gguf import load_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(os.path.dirname(ROOT), "shared", "data", "lm")
Q8 = gguf.GGMLQuantizationType.Q8_0


def q8_overrides(path: str) -> dict:
  """Q8_0 blocks of every 2-D tensor of `path` whose rows are whole 32-value blocks."""
  out = {}
  for t in gguf.GGUFReader(path).tensors:
    data = np.asarray(t.data, np.float32)
    if data.ndim == 2 and data.shape[-1] % 32 == 0:
      out[t.name] = (gguf.quants.quantize(data, Q8), Q8)
  return out


def llama_cpp_logits(path: str, ids: list[int]):
  from llama_cpp import Llama  # pylint: disable=import-outside-toplevel
  # A float32 KV cache (type 0; llama.cpp's default is F16), so F32 files compare in F32.
  llm = Llama(model_path=path, logits_all=True, n_ctx=max(512, len(ids) + 8), n_threads=2,
              type_k=0, type_v=0, verbose=False)
  llm.eval(ids)
  return llm, np.array(llm.scores[:len(ids)], np.float32)


def check(name: str, path: str, text: str, n_tokens: int, n_new: int) -> None:
  model, variables, tok, _ = load_gguf(path)
  ids = tok.encode(text).ids
  llm, theirs = llama_cpp_logits(path, ids[:n_tokens])
  lines = [l for l in text.splitlines() if l.strip()]
  same_lines = sum(llm.tokenize(l.encode(), add_bos=True, special=False) == tok.encode(l).ids
                   for l in lines)
  same_text = llm.tokenize(text.encode(), add_bos=True, special=False) == ids
  ours = np.asarray(jax.jit(model.apply)(variables, np.asarray([ids[:n_tokens]])))[0]
  diff = np.abs(theirs - ours).max()
  agree = np.mean(theirs.argmax(-1) == ours.argmax(-1))
  llm.reset()
  greedy = llm.create_completion("", max_tokens=n_new, temperature=0.0, top_k=1)
  print(f"{name}: tokenizer ids equal on the whole text ({len(ids)} ids): {same_text}; "
        f"on {same_lines}/{len(lines)} lines")
  print(f"  logits over {len(theirs)} tokens: max |llama.cpp - baq| {diff:.3g} "
        f"({diff / ours.std():.3g} of baq's std), argmax agreement {agree:.4f}")
  print(f"  llama.cpp greedy from BOS: {greedy['choices'][0]['text']!r}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gguf", default=os.path.join(LM, "stories260K.gguf"))
  p.add_argument("--text", default=os.path.join(LM, "tinystories_valid_sample.txt"))
  p.add_argument("--tokens", type=int, default=256, help="prefix whose logits are compared")
  p.add_argument("--new", type=int, default=64, help="greedy tokens llama.cpp generates")
  args = p.parse_args(argv)
  with open(args.text, encoding="utf-8") as f:
    text = f.read()
  model, variables, tok, family = load_gguf(args.gguf)
  cfg, params = model.config, variables["params"]
  with tempfile.TemporaryDirectory() as tmp:
    f32 = write_gguf(os.path.join(tmp, "f32.gguf"), cfg, params, family, tok)
    files = {"original": args.gguf, "baq f32": f32,
             "baq f16": write_gguf(os.path.join(tmp, "f16.gguf"), cfg, params, family, tok,
                                   dtype="f16"),
             "baq q8_0": write_gguf(os.path.join(tmp, "q8.gguf"), cfg, params, family, tok,
                                    overrides=q8_overrides(f32))}
    for name, path in files.items():
      check(name, path, text, args.tokens, args.new)


if __name__ == "__main__":
  main()
