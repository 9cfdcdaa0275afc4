r"""baq's runtime numerics against the real bitsandbytes and torch on this CPU.

Compares, element for element, baq.quant.numerics with bitsandbytes 0.50's
CPU path (LLM.int8 codes, scales and Linear8bitLt outputs; NF4/FP4
quantize_4bit/dequantize_4bit with and without double quantization, and the
MatMul4Bit linear; create_dynamic_map(); torch's mean of the absmaxes) and
torch's dynamic int8 Linear (fbgemm and x86 engines, per tensor and per
channel). Inputs: random weights with outlier columns, partial blocks, 2-D
and 3-D activations in float16, bfloat16 and float32. Each line prints what
is compared, the number of elements, how many differ and the largest
difference. Needs torch and bitsandbytes beside baq's environment:

  python -m venv --system-site-packages /tmp/bnbvenv
  /tmp/bnbvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /tmp/bnbvenv/bin/pip install bitsandbytes
  /tmp/bnbvenv/bin/python -m benchmarks.bnb_torch_check   # from the repository root

Exit status 1 if a comparison documented as bit-exact differs.
"""

from __future__ import annotations

import functools
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

logging.disable(logging.WARNING)  # bitsandbytes warns about optional CPU kernels
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402

from baq.quant import numerics  # noqa: E402
from baq.quant.numerics import _aten, four_bit, llm_int8  # noqa: E402

F32 = np.float32
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FAILED = []


def report(name: str, got, ref, exact: bool = True) -> None:
  """Prints elements compared, how many differ and the max |difference|."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  diff = np.abs(got - ref)
  n_diff = int((got != ref).sum())
  print(f"{name:62s} n={got.size:8d} differ={n_diff:6d} max|diff|={diff.max(initial=0):.3g}"
        f"{'' if exact else '  (not claimed exact)'}")
  if exact and n_diff:
    FAILED.append(name)


def jitted(fn, **options):
  """fn with its static options bound, under jax.jit (as a model runs it)."""
  return jax.jit(functools.partial(fn, **options))


def to_np(t: torch.Tensor) -> np.ndarray:
  return t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def data(m=24, d_in=160, d_out=48, seed=0, lead=()):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((*lead, m, d_in)).astype(F32)
  x[..., [3, 77, 140 % d_in]] *= 15.0  # systematic outlier features
  w = (rng.standard_normal((d_in, d_out)) * 0.05).astype(F32)
  return x, w


def check_llm_int8() -> None:
  dot = numerics.NUMERICS.get("llm_int8").dot
  # The tie: 0.505859375 * 127 / 1.01171875 is 63.5; reciprocal(1.01171875) * 127 is not.
  a = np.array([[1.01171875, 0.505859375]], np.float16)
  ca, _, _ = F.int8_vectorwise_quant(torch.from_numpy(a))
  mine, _ = llm_int8._vectorwise(jnp.asarray(a, jnp.float32), 1)
  report("llm_int8 tie codes (hand case)", mine, ca.numpy())
  for lead, size in (((), {}), ((2,), {}), ((), dict(m=1024, d_in=192, d_out=96))):
    for dt_name, dt in DTYPES.items():
      x, w = data(lead=lead, seed=len(lead), **size)
      xt = torch.from_numpy(x).to(dt)
      x_b = jnp.asarray(to_np(xt)).astype(dt_name)
      for threshold in (0.0, 6.0):
        ca, sca, cols = F.int8_vectorwise_quant(xt.reshape(-1, x.shape[-1]).half(),
                                                threshold=threshold)
        keep = None
        a32 = jnp.asarray(to_np(xt.reshape(-1, x.shape[-1]).half()))
        if threshold:
          keep = jnp.abs(a32) < threshold
        mca, msca = llm_int8._vectorwise(a32, 1, keep)
        if threshold:
          mca = jnp.where(~jnp.all(keep, axis=0), jnp.int8(0), mca)
        tag = f"{dt_name} {'3-D' if lead else '2-D'} {x.shape[-2]}x{x.shape[-1]} threshold={threshold}"
        report(f"llm_int8 activation codes CA, {tag}", mca, ca.numpy())
        report(f"llm_int8 row absmax SCA, {tag}", np.asarray(msca)[:, 0], sca.numpy())
        lin = bnb.nn.Linear8bitLt(x.shape[-1], w.shape[1], bias=False, has_fp16_weights=False,
                                  threshold=threshold)
        lin.weight = bnb.nn.Int8Params(torch.from_numpy(w.T.copy()), requires_grad=False,
                                       has_fp16_weights=False)
        lin = lin.to("cpu").eval()
        if lead == () and dt_name == "float32" and not size:
          cb, scb = llm_int8._vectorwise(jnp.asarray(w).astype(jnp.float16).astype(jnp.float32), 0)
          report(f"llm_int8 weight codes CB, threshold={threshold}", cb, lin.weight.CB.numpy().T)
          report(f"llm_int8 weight absmax SCB, threshold={threshold}", np.asarray(scb)[0],
                 lin.weight.SCB.numpy())
        with torch.no_grad():
          ref = to_np(lin(xt))
        got = jitted(dot, threshold=threshold)(x_b, jnp.asarray(w))
        report(f"llm_int8 Linear8bitLt output, {tag}", np.asarray(got.astype(jnp.float32)), ref)


def bnb_4bit(w, quant_type, blocksize, double_quant):
  """quantize_4bit of the torch weight w.T, dequantized, in baq's kernel layout.

  dequantize_4bit's AVX-512 kernel (csrc/cpu_ops.cpp, taken when in_features
  % 16 == 0) reads absmax[row * (in // blocksize) + k // blocksize], which
  is the block of element (row, k) only when blocksize divides in_features:
  otherwise the blocks quantize_4bit wrote run across rows and that kernel
  scales with the wrong absmax. Such shapes are also dequantized with
  bitsandbytes' own flat-block kernel (backends/default, the CPU backend's
  fallback), the layout of quantize_4bit, its scalar CPU path and CUDA.

  Returns:
    (dequantize_4bit's weight, the flat-block dequantization), [d_in, d_out].
  """
  from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
  q, state = F.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=blocksize,
                             compress_statistics=double_quant, quant_type=quant_type)
  cpu = F.dequantize_4bit(q, state).numpy().T
  absmax = state.absmax
  if state.nested:  # as functional.dequantize_4bit
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
  flat = _dequantize_4bit_compute(q.view(torch.uint8).reshape(-1), absmax.float(), state.code,
                                  blocksize, state.shape, torch.float32)
  return cpu, flat.numpy().T


def check_four_bit() -> None:
  report("create_dynamic_map() vs DYNAMIC_CODE", numerics.DYNAMIC_CODE,
         F.create_dynamic_map().numpy())
  # Hand cases. A partial last block is divided (x / absmax), not scaled by 1 / absmax:
  # -0.2554887 / 0.75214654 is NF4's midpoint -0.33967942, times the reciprocal just above.
  w = np.zeros((66, 1), F32)
  w[:64], w[64], w[65] = 0.01, 0.75214654, -0.2554887
  _, flat = bnb_4bit(w, "nf4", 64, False)
  report("nf4 partial block division (hand case)",
         jitted(numerics.NUMERICS.get("nf4").quantize_weight)(jnp.asarray(w)), flat)
  # Double quantization's CPU lookup table: 0.9964841 is nearest code 254 (0.99296874),
  # but its table bin lies above the midpoint, so bitsandbytes gives code 255 (1.0).
  q, _ = F.quantize_blockwise(torch.tensor([1.0, 0.996484100818634]), blocksize=256)
  codes, _ = four_bit._dynamic_blockwise(jnp.asarray([1.0, 0.996484100818634], jnp.float32))
  report("double-quant lookup-table codes (hand case)", codes, q.numpy())
  v = np.array([1.0] + [2.0**-24] * 15 + [2.0**-23] * 4, F32)
  report("torch sum order (hand case)", jax.jit(_aten.cascade_sum)(jnp.asarray(v)),
         torch.from_numpy(v).sum().numpy())
  rng = np.random.default_rng(3)
  for n in (5, 17, 100, 1000, 1025, 5000, 20000):
    v = rng.uniform(0, 0.3, n).astype(F32)
    report(f"torch mean vs baq cascade_sum/n, n={n}",
           jax.jit(_aten.cascade_sum)(jnp.asarray(v)) / F32(n),
           torch.from_numpy(v).mean().numpy())
  shapes = [(96, 40), (97, 300), (33, 50), (257, 129), (64, 70), (512, 520)]
  for quant_type in ("nf4", "fp4"):
    numeric = numerics.NUMERICS.get(quant_type)
    for blocksize in (64, 256):
      for double_quant in (False, True):
        for shape in shapes:
          w = (rng.standard_normal(shape) * 0.02).astype(F32)
          w[rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5)] = 0.4
          w[:, 7] *= 6.0  # an outlier input row of the torch weight
          cpu, flat = bnb_4bit(w, quant_type, blocksize, double_quant)
          got = jitted(numeric.quantize_weight, blocksize=blocksize,
                       double_quant=double_quant)(jnp.asarray(w))
          part = "partial" if (shape[0] * shape[1]) % blocksize else "full"
          name = f"{quant_type} weight bs={blocksize} dq={double_quant} {shape} ({part} last block)"
          if shape[0] % blocksize:  # blocks across rows: see bnb_4bit
            report(name + " vs flat-block dequant", got, flat)
            report(name + " vs dequantize_4bit AVX-512", got, cpu, exact=shape[0] % 16 != 0)
          else:
            report(name, got, cpu)
  x, w = data(lead=(2,))
  for quant_type in ("nf4", "fp4"):
    _, ref_w = bnb_4bit(w, quant_type, 64, True)
    for dt_name, dt in DTYPES.items():
      xt = torch.from_numpy(x).to(dt)
      ref = torch.nn.functional.linear(xt, torch.from_numpy(ref_w.T.copy()).to(dt))
      got = jitted(numerics.NUMERICS.get(quant_type).dot, double_quant=True,
                   compute_dtype=dt_name)(jnp.asarray(x), jnp.asarray(w))
      report(f"{quant_type} MatMul4Bit linear, compute {dt_name}, 3-D", got, to_np(ref),
             exact=False)


def check_dynamic_int8() -> None:
  from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
  dot = numerics.NUMERICS.get("dynamic_int8").dot
  for engine in ("fbgemm", "x86"):
    torch.backends.quantized.engine = engine
    for per_channel in (False, True):
      for lead in ((), (2,)):
        x, w = data(lead=lead, seed=5)
        x[..., 0] = np.abs(x[..., 0])
        lin = torch.nn.Sequential(torch.nn.Linear(w.shape[0], w.shape[1], bias=False))
        lin[0].weight.data = torch.from_numpy(w.T.copy())
        qc = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        q = torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear: qc}, dtype=torch.qint8)
        with torch.no_grad():
          ref = q(torch.from_numpy(x)).numpy()
        got = jitted(dot, per_channel=per_channel)(jnp.asarray(x), jnp.asarray(w))
        report(f"dynamic_int8 {engine} per_channel={per_channel} reduce_range=True "
               f"{'3-D' if lead else '2-D'}", got, ref)
  try:
    dot(jnp.asarray(x), jnp.asarray(w), reduce_range=False)
    print("dynamic_int8 reduce_range=False: accepted (unexpected)")
    FAILED.append("reduce_range=False accepted")
  except ValueError as e:
    print(f"dynamic_int8 reduce_range=False refused: {e}")


def main() -> int:
  print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"bitsandbytes {bnb.__version__}, quantized engines "
        f"{torch.backends.quantized.supported_engines}, torch threads {torch.get_num_threads()}")
  check_llm_int8()
  check_four_bit()
  check_dynamic_int8()
  print("FAILED: " + ", ".join(FAILED) if FAILED else "every comparison claimed exact is exact")
  return 1 if FAILED else 0


if __name__ == "__main__":
  sys.exit(main())
