r"""baq's GPTQ against GPTQModel's on the same CPU, model and calibration data.

Side by side, for stories260K (the trained GGUF in ../shared/data/lm, as a
Hugging Face folder) and a GPT-2-124M-sized random model: 4-bit GPTQ per
output channel (group_size -1), no act-order, symmetric, damping 0.01 of the
mean Hessian diagonal, on the same calibration windows (Tiny Shakespeare,
128 windows of 128 tokens after <bos>, stories260K's tokenizer); it prints
seconds per quantized layer and in all, and the perplexity on TinyStories
windows of the float model and baq's GPTQ (scored by baq) and GPTQModel's
quantized model (scored in torch on the same windows, and its saved
checkpoint read by baq's GPTQ reader and scored by baq).

GPTQModel runs in a torch environment of its own (it asks for torch>=2.14.1):

  python -m venv --system-site-packages /tmp/gptqvenv
  /tmp/gptqvenv/bin/pip install gptqmodel==7.7.0 transformers
  CUDA_VISIBLE_DEVICES= python -m benchmarks.gptq_vs_gptqmodel --torch_python=/tmp/gptqvenv/bin/python \
      [--models=stories,gpt2] [--calib=128] [--work=/tmp/gptq_vs]

The GPTQModel half is this file run by --torch_python with --side=gptqmodel.
"""

import argparse
import json
import os
import subprocess
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(ROOT, os.pardir, "shared", "data", "lm")


def gptqmodel_side(args) -> None:
  """In the torch environment: a random GPT-2 folder (--make_gpt2) or GPTQModel's GPTQ."""
  import torch  # pylint: disable=import-outside-toplevel
  if args.make_gpt2:
    from transformers import GPT2Config, GPT2LMHeadModel  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=1, eos_token_id=2)).save_pretrained(args.folder)
    return
  from gptqmodel import GPTQModel, QuantizeConfig  # pylint: disable=import-outside-toplevel
  ids = np.load(args.calib_file)
  calib = [{"input_ids": torch.tensor(r[None]), "attention_mask": torch.ones(1, len(r))}
           for r in ids]
  # act_group_aware (its default for GPTQ) refuses group_size -1; off, as in the paper.
  cfg = QuantizeConfig(bits=4, group_size=-1, desc_act=False, sym=True, damp_percent=0.01,
                       act_group_aware=False)
  evals = torch.tensor(np.load(args.calib_file.replace("calib", "eval")), dtype=torch.long)

  def ppl(m):  # in torch; baq's GPTQ reader refuses GPTQModel's packing of a d_in that is
    # no multiple of 8 (stories260K's down_proj, 172: 22 rows, not 21.5)
    with torch.no_grad():
      lp = torch.cat([torch.log_softmax(m(evals[i:i + 16]).logits[:, :-1].float(), -1)
                      .gather(-1, evals[i:i + 16, 1:, None])[..., 0]
                      for i in range(0, len(evals), 16)])
    return float(torch.exp(-lp.mean()))

  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  # The torch scoring's own check: the float model here must give baq's float perplexity.
  float_ppl = ppl(AutoModelForCausalLM.from_pretrained(args.folder, torch_dtype=torch.float32))
  model = GPTQModel.load(args.folder, cfg, device="cpu")
  t = time.perf_counter()
  model.quantize(calib, batch_size=16)
  seconds = time.perf_counter() - t
  model.save(args.out)
  # Scored as saved and loaded back: after quantize() the in-memory model is GPTQModel's
  # working copy (its layers offloaded), not the deployed one.
  # The plain torch kernel: the CPU's fused int4 kernel refuses an N that is no
  # multiple of 16 (stories260K's 172-wide down_proj).
  from gptqmodel import BACKEND  # pylint: disable=import-outside-toplevel
  quantized = GPTQModel.load(args.out, device="cpu", backend=BACKEND.GPTQ_TORCH)
  print(json.dumps(dict(seconds=seconds, ppl=ppl(quantized.model), float_ppl=float_ppl)))


def _windows(tokenizer, path, n, width, seed=0):
  from baq.data.text import tokenizer as tok  # pylint: disable=import-outside-toplevel
  bos = tok.special_ids(tokenizer)["bos"]
  with open(path) as f:
    lines = [l.strip() for l in f if l.strip()]
  stream = np.asarray([i for e in tokenizer.encode_batch(lines, add_special_tokens=False)
                       for i in e.ids], np.int32)
  if n is None:  # consecutive windows of the whole text
    starts = range(0, len(stream) - width, width)
  else:
    starts = np.random.default_rng(seed).integers(0, len(stream) - width, n)
  return np.stack([np.concatenate([[bos], stream[s:s + width]]) for s in starts]).astype(np.int32)


def _ppl(model, params, ids) -> float:
  from baq.models.lm import scoring  # pylint: disable=import-outside-toplevel
  lp = np.asarray(scoring.token_log_probs(model, {"params": params}, ids,
                                          np.full(len(ids), ids.shape[1]), batch_size=64))
  return float(np.exp(-lp.mean()))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--side", default="baq")
  ap.add_argument("--torch_python", default="/tmp/gptqvenv/bin/python")
  ap.add_argument("--models", default="stories,gpt2")
  ap.add_argument("--calib", type=int, default=128)
  ap.add_argument("--work", default="/tmp/gptq_vs")
  ap.add_argument("--folder"), ap.add_argument("--out"), ap.add_argument("--calib_file")
  ap.add_argument("--make_gpt2", action="store_true")
  ap.add_argument("--grid", default="full", help="baq's GPTQ grid (gptq.GRIDS): 'full' is "
                  "GPTQ's 2^b levels, as GPTQModel quantizes; 'restricted' baq's 2^b - 1")
  args = ap.parse_args()
  if args.side == "gptqmodel":
    return gptqmodel_side(args)
  from baq.models.lm import gguf, hf  # pylint: disable=import-outside-toplevel
  from baq.ptq import decoder as gd  # pylint: disable=import-outside-toplevel
  os.makedirs(args.work, exist_ok=True)
  # GPTQModel's CPU pool is (cores + 1) // 2 workers, and its model loader asks for 2:
  # on 2 cores it refuses ("requests 2 workers but parent 'cpu' only has 1").
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPTQMODEL_CPU_WORKERS="2")
  me = os.path.abspath(__file__)
  _, _, tokenizer, _ = gguf.load_gguf(os.path.join(LM, "stories260K.gguf"))
  calib = _windows(tokenizer, os.path.join(LM, "tinyshakespeare.txt"), args.calib, 127)
  evals = _windows(tokenizer, os.path.join(LM, "tinystories_valid_sample.txt"), None, 127)
  calib_file = os.path.join(args.work, "calib.npy")
  np.save(calib_file, calib)
  np.save(calib_file.replace("calib", "eval"), evals)
  print(f"calibration {calib.shape}, evaluation {evals.shape} (stories260K tokenizer)")
  for name in args.models.split(","):
    folder = os.path.join(args.work, name)
    if name == "stories":
      gguf.gguf_to_hf(os.path.join(LM, "stories260K.gguf"), folder)
    else:
      subprocess.run([args.torch_python, me, "--side=gptqmodel", "--make_gpt2",
                      f"--folder={folder}"], check=True, env=env, cwd=args.work)
      tokenizer.save(os.path.join(folder, "tokenizer.json"))  # ids < 512: GPT-2's vocab holds them
    model, variables, _, _ = hf.load(folder)
    t = time.perf_counter()
    q, records = gd.quantize_decoder(model, variables, gd.Tokens(calib, np.full(len(calib),
                                                                               calib.shape[1])),
                                     bits=4, options=gd.Options(method="gptq", group_size=None,
                                                                grid=args.grid))
    baq_s = time.perf_counter() - t
    layers = len([k for k in records if not k.startswith("_")])
    out = os.path.join(args.work, f"{name}_gptqmodel")
    r = subprocess.run([args.torch_python, me, "--side=gptqmodel", f"--folder={folder}",
                        f"--out={out}", f"--calib_file={calib_file}"], env=env,
                       capture_output=True, text=True, cwd=args.work)  # its logs/ there
    if r.returncode:
      print(f"{name}: GPTQModel failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
      other = None
    else:
      other = json.loads(r.stdout.strip().splitlines()[-1])
    fp, ours = _ppl(model, variables["params"], evals), _ppl(model, q, evals)
    line = (f"{name}: {layers} layers; baq GPTQ ({args.grid} grid) {baq_s:.1f} s ({baq_s / layers:.2f} s a layer), "
            f"perplexity float {fp:.3f}, baq {ours:.3f}")
    if other is not None:
      from baq.export import gptq_lm  # pylint: disable=import-outside-toplevel
      gm, gvars, _, _ = gptq_lm.load_gptq(out)  # GPTQModel's checkpoint, read by baq
      other["baq_ppl"] = _ppl(gm, gvars["params"], evals)
      line += (f"; GPTQModel {other['seconds']:.1f} s ({other['seconds'] / layers:.2f} s a "
               f"layer), perplexity {other['ppl']:.3f} (in torch, whose float model gives "
               f"{other['float_ppl']:.3f}; its checkpoint read by baq's GPTQ reader "
               f"{other['baq_ppl']:.3f})")
    print(line, flush=True)


if __name__ == "__main__":
  main()
