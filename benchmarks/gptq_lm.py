r"""GPTQ over a causal LM: seconds per decoder block against width, and peak memory.

  python -m benchmarks.gptq_lm [--widths=64,128,256,512] [--seqs=32] [--seq_len=64] \
      [--bits=4] [--family=llama] [--blocks=2] [--depth_width=256] [--depth_blocks=4]

(`python benchmarks/gptq_lm.py` runs the same.) On a CPU shared with other
jobs, prefix XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (see benchmarks/gptq.py).

Random `CausalLM`s, Llama-style (rmsnorm, rope, swiglu, 4 query heads per
key/value head, d_ff = 8/3 d rounded up to a multiple of 32) and GPT-2-style
(layernorm, learned positions, gelu, biases, tied head, d_ff = 4 d), head
width 32, go through `baq.ptq.decoder.quantize_decoder` on `seqs` x `seq_len`
random calibration tokens at `bits` bits per output channel, three times per
width in this one process: GPTQ, round to nearest (options.method="rtn",
which still runs the block forwards and Gram matrices for its error records)
and Fair-GPTQ (alpha 0.1, `seqs` pairs whose sides differ in one token in
eight).

Time table, per family and width, from records["_blocks"]["seconds"]:
the first block (it carries the compilation of the GPTQ programs at this
width's shape buckets) and the mean of the later blocks, each with the
seconds of JAX tracing + lowering + compilation inside it (jax.monitoring
events, attributed to a block by when they end); `ratio`, later s/block over
that at the smallest width; `flops`, the same ratio of a FLOP count (per
block: each layer group's Gram matrix, 2 N d_in^2 for N tokens, GPTQ's
2 d_in^2 d_out + d_in^3 at the kernel padded to GPTQ's shape bucket, and the
block forwards that `quantize_decoder` runs, one per layer group plus one,
2 N params each); `vs flops`, ratio / flops (1: time grows as the work; below
1: fixed costs dominate); `kern s`, the later blocks' seconds inside the
per-layer quantization (records[layer]["seconds"]: GPTQ on a ready Hessian
and the error records), the rest being compilation, block forwards and Gram
matrices; RTN and Fair-GPTQ later s/block, as themselves and as multiples of
GPTQ's.

Memory table: the peak RSS growth during each call (free heap returned
with malloc_trim, /proc/self/clear_refs reset to the current RSS first, then
VmHWM after the call less VmRSS before), beside what `quantize_decoder`
holds per block, one block's inputs for the calibration set (n t d 4 bytes,
times 3 with the two sides of the pairs), and the float32 model size. Then
one width at `blocks` and at `depth_blocks` blocks: the calibration memory
is per block and does not grow with depth; what grows is the quantized
copy of the kernels that the call returns and the programs compiled for
each block (JAX keeps them cached after the call).
Ends with the command line used.
"""

import ctypes
import ctypes.util
import gc
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.ptq import decoder as gd

flags.DEFINE_list("widths", ["64", "128", "256", "512"], "d_model values.")
flags.DEFINE_integer("seqs", 32, "Calibration sequences (and pairs for Fair-GPTQ).")
flags.DEFINE_integer("seq_len", 64, "Tokens per calibration sequence.")
flags.DEFINE_integer("bits", 4, "Bit-width of every projection.")
flags.DEFINE_enum("family", "llama", ["llama", "gpt2", "both"], "Decoder style.")
flags.DEFINE_integer("blocks", 2, "Decoder blocks of the timed models.")
flags.DEFINE_integer("depth_width", 256, "Width of the depth comparison (0: skip it).")
flags.DEFINE_integer("depth_blocks", 4, "Blocks of the deeper model in the depth comparison.")
flags.DEFINE_float("alpha", 0.1, "Fair-GPTQ's pair weight.")
FLAGS = flags.FLAGS

_VOCAB, _HEAD = 512, 32
_MIB = 2.0**20
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compiles: list[tuple[float, float]] = []  # (perf_counter when it ended, seconds)


def _on_event(event: str, seconds: float, **kwargs) -> None:
  del kwargs
  if event in _COMPILE_EVENTS:
    _compiles.append((time.perf_counter(), seconds))


def config(family: str, d: int, n_layers: int, seq_len: int) -> DecoderConfig:
  """A random-weight decoder of the family at width d."""
  heads = max(1, d // _HEAD)
  if family == "llama":
    return DecoderConfig(vocab_size=_VOCAB, d_model=d, n_layers=n_layers, n_heads=heads,
                         n_kv_heads=max(1, heads // 4), d_ff=-(-8 * d // (3 * 32)) * 32,
                         max_len=seq_len)
  return DecoderConfig(vocab_size=_VOCAB, d_model=d, n_layers=n_layers, n_heads=heads,
                       d_ff=4 * d, max_len=seq_len, norm="layernorm", positions="learned",
                       mlp="gelu_tanh", attn_bias=True, out_bias=True, mlp_bias=True,
                       tie_embeddings=True)


def _layers(cfg: DecoderConfig) -> list[list[tuple[int, int]]]:
  """(d_in, d_out) of each projection, in `baq.ptq.decoder.SEQUENTIAL`'s groups."""
  d, kv, f = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
  qkv = [(d, cfg.n_heads * cfg.head_dim), (d, kv), (d, kv)]
  mlp = [(d, f), (d, f)] if cfg.mlp == "swiglu" else [(d, f)]
  return [qkv, [(cfg.n_heads * cfg.head_dim, d)], mlp, [(f, d)]]


def block_flops(cfg: DecoderConfig, tokens: int, streams: int = 1) -> float:
  """What `quantize_decoder` computes per block (see the module docstring);
  `streams` is 3 with pairs (calibration set and both sides)."""
  pad = lambda n, m: -(-n // m) * m  # gptq's buckets: rows to the block (128), columns to 32
  groups = _layers(cfg)
  params = sum(i * o for g in groups for i, o in g)
  gram = sum(2.0 * tokens * g[0][0]**2 for g in groups) * (1 if streams == 1 else 2)
  solve = sum(2.0 * pad(i, 128)**2 * pad(o, 32) + pad(i, 128)**3 for g in groups for i, o in g)
  forward = (len(groups) + 1) * 2.0 * tokens * params * streams
  return gram + solve + forward


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _reset_peak() -> bool:
  """Returns freed heap to the system and resets VmHWM to the current RSS."""
  gc.collect()
  _libc.malloc_trim(0)  # glibc keeps freed blocks resident otherwise
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def tokens(n: int, t: int, seed: int) -> gd.Tokens:
  ids = np.random.default_rng(seed).integers(0, _VOCAB, (n, t)).astype(np.int32)
  return gd.Tokens(ids, np.full(n, t, np.int32))


def measure(model, variables, calib, pairs, options) -> dict:
  """One quantize_decoder call: per-block seconds and compile seconds, peak RSS growth."""
  exact = _reset_peak()
  rss0 = _status_kib("VmRSS")
  del _compiles[:]
  _, rec = gd.quantize_decoder(model, variables, calib, bits=FLAGS.bits, pairs=pairs,
                               options=options)
  t_ret = time.perf_counter()
  grew = (_status_kib("VmHWM") - rss0) * 1024 / _MIB
  secs = list(rec["_blocks"]["seconds"])
  ends = [t_ret - sum(secs[i + 1:]) for i in range(len(secs))]
  comp = [sum(s for t, s in _compiles if e - b <= t <= e) for b, e in zip(secs, ends)]
  kern = [sum(r["seconds"] for k, r in rec.items() if k.startswith(f"block_{i}/"))
          for i in range(len(secs))]
  later = lambda xs: float(np.mean(xs[1:])) if len(xs) > 1 else np.nan
  return dict(first=secs[0], later=later(secs), c_first=comp[0], c_later=later(comp),
              k_later=later(kern), rss=grew, exact=exact)


def build(family: str, d: int, n_layers: int):
  cfg = config(family, d, n_layers, FLAGS.seq_len)
  model = CausalLM(cfg)
  variables = jax.jit(model.init)(jax.random.key(d), jnp.zeros((1, FLAGS.seq_len), jnp.int32))
  nbytes = sum(x.size * 4 for x in jax.tree.leaves(variables["params"]))
  block = sum(x.size * 4 for x in jax.tree.leaves(variables["params"]["block_0"]))
  return cfg, model, variables, nbytes / _MIB, block / _MIB


def _pairs(n: int, t: int):
  a = tokens(n, t, 1)
  ids = a.ids.copy()
  swap = np.random.default_rng(2).random(ids.shape) < 1 / 8
  ids[swap] = (ids[swap] + 1) % _VOCAB
  return a, gd.Tokens(ids, a.lengths)


def main(argv):
  del argv
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  n, t = FLAGS.seqs, FLAGS.seq_len
  calib, pairs = tokens(n, t, 0), _pairs(n, t)
  widths = [int(w) for w in FLAGS.widths]
  families = ["llama", "gpt2"] if FLAGS.family == "both" else [FLAGS.family]
  plain, rtn = gd.Options(), gd.Options(method="rtn")
  fair = gd.Options(alpha=FLAGS.alpha)
  rows, t_all = [], time.perf_counter()
  for family in families:
    for d in widths:
      cfg, model, variables, model_mib, block_mib = build(family, d, FLAGS.blocks)
      r = dict(family=family, d=d, d_ff=cfg.d_ff, model=model_mib, block=block_mib,
               flops=block_flops(cfg, n * t), flops_fair=block_flops(cfg, n * t, 3))
      r["gptq"] = measure(model, variables, calib, None, plain)
      r["rtn"] = measure(model, variables, calib, None, rtn)
      r["fair"] = measure(model, variables, calib, pairs, fair)
      rows.append(r)
      print(f"  measured {family} d={d} ({time.perf_counter() - t_all:.0f} s)", flush=True)

  print(f"\nquantize_decoder, {FLAGS.blocks} blocks, {n} x {t} calibration tokens, "
        f"{FLAGS.bits} bits per channel, {jax.devices()[0].platform}; seconds per block "
        f"(compile s in brackets); ratio: later s/block / smallest width's")
  print(f"{'family':6s} {'d':>4s} {'d_ff':>5s} {'first s':>13s} {'later s':>13s} "
        f"{'ratio':>6s} {'flops':>6s} {'vs flops':>8s} {'kern s':>6s} {'rtn s':>6s} {'/gptq':>5s} "
        f"{'fair s':>6s} {'/gptq':>5s}")
  for r in rows:
    base = next(b for b in rows if b["family"] == r["family"])
    g = r["gptq"]
    ratio, fr = g["later"] / base["gptq"]["later"], r["flops"] / base["flops"]
    print(f"{r['family']:6s} {r['d']:4d} {r['d_ff']:5d} {g['first']:6.2f} ({g['c_first']:4.2f}) "
          f"{g['later']:6.2f} ({g['c_later']:4.2f}) {ratio:6.2f} {fr:6.1f} {ratio / fr:8.2f} "
          f"{g['k_later']:6.2f} {r['rtn']['later']:6.2f} {r['rtn']['later'] / g['later']:5.2f} "
          f"{r['fair']['later']:6.2f} {r['fair']['later'] / g['later']:5.2f}")

  exact = all(r[k]["exact"] for r in rows for k in ("gptq", "rtn", "fair"))
  how = "VmHWM reset per call" if exact else "VmHWM not resettable: growth past the old peak"
  print(f"\npeak RSS growth per call, MiB ({how}); calib: one block's inputs "
        "(fair: x3, with the pairs)")
  print(f"{'family':6s} {'d':>4s} {'model':>7s} {'block':>6s} {'calib':>6s} {'fair calib':>10s} "
        f"{'gptq':>7s} {'rtn':>7s} {'fair':>7s}")
  for r in rows:
    calib_mib = n * t * r["d"] * 4 / _MIB
    print(f"{r['family']:6s} {r['d']:4d} {r['model']:7.2f} {r['block']:6.2f} {calib_mib:6.2f} "
          f"{3 * calib_mib:10.2f} {r['gptq']['rss']:7.1f} {r['rtn']['rss']:7.1f} "
          f"{r['fair']['rss']:7.1f}")

  if FLAGS.depth_width:
    d, family = FLAGS.depth_width, families[0]
    print(f"\ndepth, {family} d={d}, GPTQ: peak RSS growth against blocks (MiB)")
    print(f"{'blocks':>6s} {'model':>7s} {'calib/blk':>9s} {'rss growth':>10s} {'s/block':>8s}")
    out = []
    for blocks in (FLAGS.blocks, FLAGS.depth_blocks):
      _, model, variables, model_mib, block_mib = build(family, d, blocks)
      m = measure(model, variables, calib, None, plain)
      out.append((blocks, model_mib, block_mib, m))
      print(f"{blocks:6d} {model_mib:7.2f} {n * t * d * 4 / _MIB:9.2f} {m['rss']:10.1f} "
            f"{m['later']:8.2f}")
    (b0, _, blk, m0), (b1, _, _, m1) = out
    print(f"growth difference {m1['rss'] - m0['rss']:.1f} MiB for {b1 - b0} more blocks "
          f"({(b1 - b0) * blk:.1f} MiB of block parameters; calibration inputs held: "
          f"{n * t * d * 4 / _MIB:.2f} MiB at either depth)")

  print(f"\n{time.perf_counter() - t_all:.0f} s; command: "
        + " ".join([sys.executable.rsplit('/', 1)[-1]] + sys.argv))


if __name__ == "__main__":
  app.run(main)
