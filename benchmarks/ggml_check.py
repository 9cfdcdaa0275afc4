r"""baq's GGUF codec (`baq.quant.numerics.ggml`) against llama.cpp's own quantizer.

For each of the ten types, llama.cpp (through llama-cpp-python's
`llama_model_quantize`, ftype MOSTLY_<TYPE>, pure, no importance matrix)
quantizes two F32 llama GGUFs:

  * random: 2 blocks, width 256, FFN 512, vocab 512 (the tokenizer and
    metadata of stories260K, hyperparameters replaced), N(0, 0.02) weights
    with a few outliers, zero, constant, positive and tied rows: every row
    divides into 256, so every type is itself;
  * stories260K: the trained model of ../shared/data/lm (width 64, FFN 172):
    rows of 64 take the k-quants' fallbacks, the FFN-down rows of 172 F16.

Every 2-D tensor llama.cpp wrote is read back with gguf.GGUFReader and
compared, byte for byte, with `ggml.quantize` of the same F32 rows in the
type baq's `ggml.stored_type` predicts. Per type and model it prints the
tensors compared, how many got the predicted type, how many are
byte-identical, the differing blocks, the largest difference of the
dequantized values, the relative error ||dequant(quant(W)) - W|| / ||W|| over
those tensors and the seconds baq's numpy codec took.

  pip install llama-cpp-python gguf   # llama-cpp-python builds llama.cpp (minutes)
  python -m benchmarks.ggml_check [--keep=/tmp/ggml_check]
"""

import argparse
import ctypes
import os
import tempfile
import time

import gguf
import llama_cpp
import numpy as np

from baq.quant.numerics import ggml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(os.path.dirname(ROOT), "shared", "data", "lm", "stories260K.gguf")
TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")
# With --pure, an ftype's mixture collapses to its default type: Q4_K_S -> Q4_K.
FTYPES = {"q5_k": "Q5_K_S", "q4_k": "Q4_K_S", "q3_k": "Q3_K_S"}
HPARAMS = {"llama.embedding_length": 256, "llama.feed_forward_length": 512,
           "llama.block_count": 2, "llama.rope.dimension_count": 32}


def write_random_llama(path: str, like: gguf.GGUFReader, seed: int = 0) -> None:
  """A llama GGUF with like's metadata, HPARAMS' shapes and random F32 weights."""
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(path, "llama")
  for name, field in like.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
      continue
    value = HPARAMS.get(name, field.contents())
    sub = field.types[1] if len(field.types) > 1 else None
    writer.add_key_value(name, value, field.types[0], sub_type=sub)
  width, ffn = HPARAMS["llama.embedding_length"], HPARAMS["llama.feed_forward_length"]
  vocab = len(like.fields["tokenizer.ggml.tokens"].contents())
  heads = like.fields["llama.attention.head_count"].contents()
  kv = width // heads * like.fields["llama.attention.head_count_kv"].contents()

  def weight(rows, cols):
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w.reshape(-1)[rng.integers(0, w.size, 8)] *= 50  # outliers set some blocks' scales
    w[0] = 0.0  # all-zero blocks
    w[1, :cols // 2] = 0.01  # constant blocks
    w[2] = np.abs(w[2])  # positive blocks: an affine grid's minimum above 0
    w[3] = np.round(w[3] * 400) / 400  # repeated values, ties
    w[4] = -0.0  # negative zeros (gguf.quants and ggml differ in the sign of d)
    return w

  writer.add_tensor("token_embd.weight", weight(vocab, width))
  writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
  writer.add_tensor("output.weight", weight(vocab, width))
  for i in range(HPARAMS["llama.block_count"]):
    for name, shape in (("attn_q", (width, width)), ("attn_k", (kv, width)),
                        ("attn_v", (kv, width)), ("attn_output", (width, width)),
                        ("ffn_gate", (ffn, width)), ("ffn_up", (ffn, width)),
                        ("ffn_down", (width, ffn))):
      writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
    for name in ("attn_norm", "ffn_norm"):
      writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(width, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def llama_quantize(src: str, dst: str, qtype: str) -> None:
  """llama.cpp's quantizer: one type for every tensor it quantizes (--pure)."""
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPES.get(qtype, qtype.upper())}")
  params.pure = True
  params.nthread = 2
  rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
  if rc != 0:
    raise RuntimeError(f"llama_model_quantize({qtype}) returned {rc}")


def compare(src: str, dst: str) -> dict:
  """baq's bytes against llama.cpp's, per 2-D tensor of src."""
  rows = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(src).tensors if len(t.shape) == 2}
  out = dict(tensors=0, predicted=0, identical=0, blocks=0, diff_blocks=0, max_diff=0.0,
             stored=set(), seconds=0.0, err2=0.0, norm2=0.0)
  for t in gguf.GGUFReader(dst).tensors:
    if t.name not in rows:
      continue
    w, theirs = rows[t.name], np.asarray(t.data)
    stored = t.tensor_type.name.lower()
    out["tensors"] += 1
    out["stored"].add(stored)
    out["predicted"] += stored == ggml.stored_type(qtype_of[dst], w.shape[1])
    if stored == "f16":
      ours, size = w.astype(np.float16).view(np.uint8), 2
      theirs = theirs.view(np.uint8)
      deq = lambda b: b.view(np.float16).astype(np.float32)
    else:
      start = time.time()
      ours = ggml.quantize(w, stored)
      out["seconds"] += time.time() - start
      size = ggml.TYPES[stored].type_size
      deq = lambda b, s=stored: ggml.dequantize(b, s)
    theirs = theirs.reshape(w.shape[0], -1)
    same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1)
    out["blocks"] += same.size
    out["diff_blocks"] += int((~same).sum())
    out["identical"] += bool(same.all())
    out["max_diff"] = max(out["max_diff"], float(np.abs(deq(ours) - deq(theirs)).max()))
    out["err2"] += float(((deq(theirs).reshape(w.shape) - w.astype(np.float64)) ** 2).sum())
    out["norm2"] += float((w.astype(np.float64) ** 2).sum())
  return out


qtype_of = {}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--keep", default="", help="write the GGUFs here (default: a temp dir)")
  args = parser.parse_args()
  llama_cpp.llama_backend_init()
  quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
  llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
  folder = args.keep or tempfile.mkdtemp(prefix="ggml_check_")
  os.makedirs(folder, exist_ok=True)
  models = {"random": os.path.join(folder, "random_f32.gguf")}
  write_random_llama(models["random"], gguf.GGUFReader(STORIES))
  if os.path.exists(STORIES):
    models["stories260K"] = STORIES
  print(f"llama-cpp-python {llama_cpp.__version__}")
  print(f"{'type':6} {'model':12} {'stored as':18} {'tensors':>7} {'predicted':>9} "
        f"{'identical':>9} {'diff blocks':>15} {'max |deq diff|':>14} {'rel err':>8} {'baq s':>6}")
  for qtype in TYPES:
    for model, src in models.items():
      dst = os.path.join(folder, f"{model}_{qtype}.gguf")
      qtype_of[dst] = qtype
      llama_quantize(src, dst, qtype)
      r = compare(src, dst)
      print(f"{qtype:6} {model:12} {','.join(sorted(r['stored'])):18} {r['tensors']:7d} "
            f"{r['predicted']:9d} {r['identical']:9d} {r['diff_blocks']:7d}/{r['blocks']:<7d} "
            f"{r['max_diff']:14.3g} {(r['err2'] / r['norm2']) ** 0.5:8.4f} {r['seconds']:6.2f}")


if __name__ == "__main__":
  main()
