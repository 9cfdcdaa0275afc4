"""`model.dtype`: bfloat16 mixed precision of the image models, float32 unchanged.

For a SmallCNN, a ResNet, a tiny DeiT and a tiny TinyViT, with and without
injected quantization: bf16 logits are float32 and close to the float32
model's with the same parameters; the bf16 program's convolutions and
matmuls take bf16 operands and the float32 program has no bf16 value at
all; a BAQ train step in bf16 keeps every parameter float32 with a finite,
nonzero bit-width gradient; and the default path is the very program Flax's
own dtype inference builds (the layers as they were before the option).
"""

import flax.traverse_util as tu
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from baq.models import MODELS, build_model
from baq.quant.inject import BITS_LEAF, Quantizer, QuantSpec
from baq.train import state as train_state
from baq.experiment import checks as validate
from baq.train.step import make_loss_fn, make_train_step
from baq.variables import apply_model
from configs import default
from test_models import RNGS, SMALL

FAMILIES = {"small_cnn": dict(widths=(8, 16), hidden=16), **{
    k: SMALL[k] for k in ("resnet18", "deit_tiny", "tinyvit_5m")}}
# 8-bit weights, as BAQ trains; with 8-bit activations too for the program
# test (their rounding flips under bf16 inputs, moving the logits 2-5%).
QUANT = Quantizer(((".*", QuantSpec(init_bits=8.0)),))
QUANT_A8 = Quantizer(((".*", QuantSpec(init_bits=8.0, act_bits=8)),))
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
# bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.004); through a
# few layers the largest logit change is ~1% of their spread (measured here
# 0.7% - 2.0% over these families, float and 8-bit weights).
BF16_TOL = 0.05


def _forward(model, variables):
  """Logits in training mode (batch statistics), as the train step runs it."""
  mutable = ["batch_stats"] if "batch_stats" in variables else []
  return lambda v: apply_model(model, v, X, train=True, mutable=mutable)[0]


def _variables(name, quant):
  # jitted: eager init compiles every initializer on its own (~4x slower here)
  return jax.jit(build_model(name, 5, quant, **FAMILIES[name]).init)(RNGS, X)


def _ops(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (pjit, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(sub, jex.ClosedJaxpr):
          yield from _ops(sub.jaxpr)
        elif isinstance(sub, jex.Jaxpr):
          yield from _ops(sub)


def _products(model, variables):
  """(operand dtypes) of each convolution and matmul, and every dtype in the program."""
  jaxpr = jax.make_jaxpr(_forward(model, variables))(variables).jaxpr
  eqns = list(_ops(jaxpr))
  prods = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns
           if e.primitive.name in ("conv_general_dilated", "dot_general")]
  dtypes = {str(v.aval.dtype) for e in eqns for v in list(e.invars) + list(e.outvars)
            if hasattr(v.aval, "dtype")}
  return prods, dtypes


@pytest.mark.parametrize("quant", [None, QUANT], ids=["float", "quantized"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_logits_are_float32_and_close(name, quant):
  variables = _variables(name, quant)
  ref = jax.jit(_forward(build_model(name, 5, quant, **FAMILIES[name]), variables))(variables)
  model = build_model(name, 5, quant, "bfloat16", **FAMILIES[name])
  out = jax.jit(_forward(model, variables))(variables)
  assert ref.dtype == out.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(out - ref)) / jnp.std(ref))
  assert 1e-5 < err < BF16_TOL, err  # it did compute in bf16, and closely


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_program_multiplies_in_bf16_and_float32_has_none(name):
  variables = _variables(name, QUANT_A8)
  layers = sum(1 for k in tu.flatten_dict(variables["params"]) if k[-1] == "kernel")
  prods, _ = _products(build_model(name, 5, QUANT_A8, "bfloat16", **FAMILIES[name]), variables)
  # Every layer's product (and attention's q.k and p.v) takes bf16 operands.
  assert len(prods) >= layers and all(p == ("bfloat16", "bfloat16") for p in prods), prods
  prods, dtypes = _products(build_model(name, 5, QUANT_A8, **FAMILIES[name]), variables)
  assert len(prods) >= layers and "bfloat16" not in dtypes


@pytest.mark.parametrize("quant", [None, QUANT], ids=["float", "quantized"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_is_flax_inference_bit_for_bit(name, quant):
  # dtype=None is Flax's own inference from the (float32) inputs and
  # parameters, i.e. the layers exactly as they were built before
  # `model.dtype` existed; the default float32 must be the same program.
  variables = _variables(name, quant)
  default_model = build_model(name, 5, quant, **FAMILIES[name])
  inferred = MODELS.get(name).build(5, quant, dtype=None, **FAMILIES[name])
  fwd, ref = _forward(default_model, variables), _forward(inferred, variables)
  assert str(jax.make_jaxpr(fwd)(variables)) == str(jax.make_jaxpr(ref)(variables))
  np.testing.assert_array_equal(jax.jit(fwd)(variables), jax.jit(ref)(variables))
  assert default_model == build_model(name, 5, quant, "float32", **FAMILIES[name])


def _config(name, dtype):
  config = default.get_config()
  config.model.name, config.model.dtype = name, dtype
  config.model.kwargs = FAMILIES[name]
  config.quant.granularity = "channel"  # BAQ per channel, the default diffq and penalties
  return config


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "deit_tiny"])
def test_bf16_baq_step_keeps_float32_parameters_and_trains_bits(name):
  config = _config(name, "bfloat16")
  setup = train_state.create_train_state(config, "baq", num_classes=3, num_groups=6,
                                         image_shape=(32, 32, 3), steps=10, lr=1e-3)
  assert setup.model.dtype == jnp.bfloat16
  rng = np.random.default_rng(1)
  batch = {"image": X, "label": jnp.asarray(rng.integers(0, 3, 4), jnp.int32),
           "group": jnp.asarray(np.arange(4) % 6, jnp.int32)}
  kw = dict(num_groups=6, budget=setup.budget)
  loss_fn = make_loss_fn(setup.model, setup.penalties, setup.layers, **kw)
  st = setup.state
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, st["batch_stats"], batch, jax.random.key(0),
                                             st["penalty_state"], st["step"])[0]))(st["params"])
  bits = [v for k, v in tu.flatten_dict(grads).items() if k[-1] == BITS_LEAF]
  assert bits and all(g.dtype == jnp.float32 for g in bits)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in bits)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in bits) > 0
  step = jax.jit(make_train_step(setup.model, setup.tx, setup.penalties, setup.layers,
                                 bit_bounds=(2.0, 8.0), **kw))
  new, metrics = step(setup.state, batch)
  leaves = jax.tree.leaves((new["params"], new["batch_stats"]))
  assert leaves and all(v.dtype == jnp.float32 for v in leaves)
  assert np.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32


def test_numerics_layers_run_under_bf16():
  # A runtime's numerics keep their own dtype rules; the float32 kernel
  # reaches them, and their output joins the bf16 stream.
  quant = Quantizer(((".*head", QuantSpec(numerics="dynamic_int8")), (".*", QuantSpec())))
  variables = _variables("small_cnn", quant)
  ref = jax.jit(_forward(build_model("small_cnn", 5, quant, **FAMILIES["small_cnn"]),
                         variables))(variables)
  out = jax.jit(_forward(build_model("small_cnn", 5, quant, "bfloat16",
                                     **FAMILIES["small_cnn"]), variables))(variables)
  assert out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out - ref)) / jnp.std(ref)) < BF16_TOL


def test_unknown_dtype_is_refused_with_the_valid_ones():
  with pytest.raises(KeyError, match="Unknown compute dtype 'float16'.*bfloat16, float32"):
    build_model("small_cnn", 3, None, "float16")
  config = _config("small_cnn", "fp16")
  with pytest.raises(KeyError, match="Unknown compute dtype 'fp16'.*bfloat16, float32"):
    validate.validate(config)
