r"""baq's GPTQ checkpoints (`baq.export.gptq_lm.export_gptq`) in PyTorch's GPTQ runtimes.

Runs in a torch environment, without baq or JAX: loads --folder with
GPTQModel (`--loader=transformers`, or GPTQModel missing: transformers'
AutoModelForCausalLM, which needs optimum and gptqmodel for GPTQ), runs it on
the npz's token ids and prints max |runtime - baq| (also over the std of
baq's logits) and argmax agreement, against each logits array of the npz.
`--exact` loads the folder again and rebuilds every quantized module as a
float32 Linear from the runtime's own dequantization (scales taken from the
file, float16 -> float32 exactly), the other tensors from the file in
float32, and runs that in float32: this checks how the runtime reads the
format (bit layout, zero points, g_idx, `dynamic` bits, tied head) apart from
its compute dtype (GPTQModel runs bfloat16 on the CPU by default; its
TorchLinear refuses float32, and transformers' float32 model casts the
quantized matmuls' inputs to bfloat16).

  python -m venv /tmp/gptqvenv && /tmp/gptqvenv/bin/pip install torch==2.13.0 && \
  /tmp/gptqvenv/bin/pip install transformers optimum safetensors tokenizers numpy
  # gptqmodel 7.7 asks for torch>=2.14.1 (a CUDA build); it is pure Python at install:
  /tmp/gptqvenv/bin/pip install --no-deps gptqmodel==7.7.0 && echo torch==2.13.0 > /tmp/pin && \
  /tmp/gptqvenv/bin/pip install -c /tmp/pin accelerate threadpoolctl device-smi protobuf pillow \
      requests pypcre tokenicer logbar ninja datasets pyarrow dill torchao defuser
  CUDA_VISIBLE_DEVICES= /tmp/gptqvenv/bin/python benchmarks/gptq_torch_check.py \
      --folder=/tmp/gptq_llama --logits=/tmp/gptq_llama.npz [--loader=gptqmodel|transformers] \
      [--backend=torch] [--dtype=auto|float16|bfloat16] [--exact] [--max_rel=1e-4]

The npz (tokens int [n, t]; logits float32 [n, t, vocab] of baq's quantized
params; optionally logits_loaded, those of `gptq_lm.load_gptq(folder)`) comes
from baq's environment. Give export_gptq a tokenizer: GPTQModel.load refuses
a Llama folder without tokenizer.json. For mixed bits pass bits={name: 3 if
"/mlp/" in name else 4 for name in gd.quantizable_layers(params, cfg.n_layers)}.

  import jax, jax.numpy as jnp, numpy as np
  from tokenizers import Tokenizer, models
  from baq.export import gptq_lm
  from baq.models.lm import LM_FAMILIES
  from baq.models.lm.decoder import CausalLM
  from baq.ptq import decoder as gd
  hf_config = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 64}
  cfg = LM_FAMILIES.get("llama").config_from_hf(hf_config); model = CausalLM(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  params = jax.tree.map(lambda x: 4 * x if x.ndim == 2 else x, params)  # logits ~1
  ids = np.random.default_rng(0).integers(0, 96, (32, 16)).astype(np.int32)
  q, rec = gd.quantize_decoder(model, {"params": params}, gd.Tokens(ids, np.full(32, 16)),
                               bits=4, options=gd.Options(group_size=32))
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
  gptq_lm.export_gptq("/tmp/gptq_llama", "llama", cfg, params, q, rec, hf_config,
                      group_size=32, tokenizer=tok)
  m2, v2, _, _ = gptq_lm.load_gptq("/tmp/gptq_llama")
  np.savez("/tmp/gptq_llama.npz", tokens=ids[:4], logits=model.apply({"params": q}, ids[:4]),
           logits_loaded=m2.apply(v2, ids[:4]))
"""

import argparse
import collections
import os
import sys

import numpy as np
import torch


def load(folder, loader, backend, dtype):
  """(HF model, loader used)."""
  kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
  if loader in ("auto", "gptqmodel"):
    try:
      from gptqmodel import BACKEND, GPTQModel  # pylint: disable=import-outside-toplevel
    except ImportError:
      if loader == "gptqmodel":
        raise
    else:
      return GPTQModel.load(folder, device="cpu", backend=BACKEND(backend), **kw).model, "gptqmodel"
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kw), "transformers"


def quantized(model):
  return [(n, m) for n, m in model.named_modules() if hasattr(m, "qweight")]


def exact_float32(model, folder):
  """The model with float32 Linears of the runtime's dequantized weights (see docstring)."""
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  st = load_file(os.path.join(folder, "model.safetensors"))
  torch.nn.Module.float(model)  # transformers refuses .float() on a quantized model
  for name, mod in quantized(model):
    mod.scales = st[f"{name}.scales"].float()
    w = mod.dequantize_weight().float()  # [in, out]
    lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=f"{name}.bias" in st)
    lin.weight.data = w.T.contiguous()
    if lin.bias is not None:
      lin.bias.data = st[f"{name}.bias"].float()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, lin)
  own = model.state_dict()
  model.load_state_dict({k: v.float() for k, v in st.items() if k in own}, strict=False)
  return model


def logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def report(tag, out, refs):
  """Prints agreement with each reference; returns max|diff| / std against the file's
  own values (logits_loaded, else logits)."""
  rels = {}
  for key, ref in refs.items():
    d = np.abs(out - ref).max()
    rel = rels[key] = d / ref.std()
    agree = (out.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{tag:>8} vs {key:<14} max|diff| {d:.3e}  / std {rel:.3e}  "
          f"mean|diff| {np.abs(out - ref).mean():.3e}  argmax {agree:.4f}")
  return rels.get("logits_loaded", rels["logits"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--folder", required=True)
  p.add_argument("--logits", required=True, help="npz with tokens and logits (see docstring)")
  p.add_argument("--loader", default="auto", choices=("auto", "gptqmodel", "transformers"))
  p.add_argument("--backend", default="torch", help="GPTQModel BACKEND value")
  p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
  p.add_argument("--exact", action="store_true", help="also the float32 rebuild")
  p.add_argument("--max_rel", type=float, default=None,
                 help="exit 1 if the exact (else runtime) max|diff| / std against "
                 "logits_loaded (else logits) exceeds this")
  a = p.parse_args(argv)
  data = np.load(a.logits)
  refs = {k: data[k].astype(np.float32) for k in ("logits", "logits_loaded") if k in data}
  model, used = load(a.folder, a.loader, a.backend, a.dtype)
  mods = quantized(model)
  kinds = collections.Counter((type(m).__name__, int(m.bits), int(m.group_size)) for _, m in mods)
  print(f"{a.folder}: {used}, {type(model).__name__}, dtype {model.dtype}, "
        f"torch {torch.__version__}; {len(mods)} quantized modules (kernel, bits, group): "
        f"{dict(kinds)}")
  head, emb = model.get_output_embeddings(), model.get_input_embeddings()
  print(f"head tied to embedding: {head.weight is emb.weight}")
  worst = report("runtime", logits(model, data["tokens"]), refs)
  if a.exact:
    model, _ = load(a.folder, a.loader, a.backend, a.dtype)
    worst = report("exact", logits(exact_float32(model, a.folder), data["tokens"]), refs)
  if a.max_rel is not None and worst > a.max_rel:
    print(f"FAIL: max|diff| / std {worst:.3e} > {a.max_rel}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
