"""The ONNX export: the jaxpr interpreter against JAX, and deployed models in onnxruntime."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from baq.allocation import projection
from baq.export import onnx as onnx_export
from baq.export import packed
from baq.export.onnx import graph, model as onnx_model, ops
from baq.models import build_model
from baq.quant import QuantMode, QuantSpec, Quantizer, fake_quant as fq, units
from baq.variables import apply_model


def _convert(fn, x, params=None, dynamic_batch=True):
  m = graph.trace_to_onnx(fn, jax.ShapeDtypeStruct(x.shape, jnp.float32), params or {},
                          ops.HANDLERS, onnx_model._marked(True), dynamic_batch=dynamic_batch)
  return m, onnx_export.session(m)


def _rand(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _layer(module, x):
  p = jax.tree_util.tree_map(np.asarray, module.init(jax.random.key(0), x))
  return (lambda x, p: module.apply(p, x)), p


_POOLS = {
    "max_pool_same": lambda x, p: nn.max_pool(x, (3, 3), (2, 2), padding="SAME"),
    "avg_pool": lambda x, p: nn.avg_pool(x, (2, 2), (2, 2)),
    "avg_pool_padded": lambda x, p: nn.avg_pool(x, (3, 3), (1, 1), padding="SAME",
                                                count_include_pad=True),
}
_ELEMENTWISE = {
    "gelu_exact": lambda x, p: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x, p: nn.gelu(x),
    "softmax": lambda x, p: jax.nn.softmax(3 * x, axis=-1),
    "round_half_away": lambda x, p: jax.lax.round(4 * x),
    "round_half_even": lambda x, p: jnp.round(4 * x),
    "clip_where": lambda x, p: jnp.where(x > 0.3, jnp.clip(x, -0.5, 0.5), x ** 3),
    "sigmoid_log": lambda x, p: jnp.log1p(jnp.exp(-jnp.abs(x))) + jax.nn.sigmoid(x),
    "pad_slice": lambda x, p: jnp.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0)))[:, 1:-1:2],
    "index_batch_axis": lambda x, p: x[:, 0] + x[:, -1],
    "mean_var": lambda x, p: jnp.var(x, axis=(1, 2)) + jnp.mean(x, axis=-1).max((1, 2))[:, None],
    "broadcast_over_batch": lambda x, p: jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(3.0), (x.shape[0], 3)), x.reshape(x.shape[0], -1)], 1),
    "split_einsum": lambda x, p: jnp.einsum("nhwc,nhvc->nwv", *jnp.split(x, 2, axis=-1)),
}


@pytest.mark.parametrize("name", sorted(_POOLS) + sorted(_ELEMENTWISE))
def test_primitives_match_jax(name):
  fn = {**_POOLS, **_ELEMENTWISE}[name]
  x = _rand(3, 8, 8, 4)
  _, sess = _convert(fn, x)
  np.testing.assert_allclose(onnx_export.run(sess, x), np.asarray(jax.jit(fn)(x, {})),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", ["conv_strided", "conv_grouped_dilated", "dense_3d",
                                   "layernorm", "batchnorm", "attention"])
def test_flax_layers_match_jax_at_any_batch(layer):
  x = _rand(2, 9, 9, 8)
  module = {"conv_strided": nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 0), (2, 1))),
            "conv_grouped_dilated": nn.Conv(8, (3, 3), feature_group_count=4,
                                            kernel_dilation=(2, 1)),
            "dense_3d": nn.DenseGeneral((2, 5), axis=(-2, -1)),
            "layernorm": nn.LayerNorm(),
            "batchnorm": nn.BatchNorm(use_running_average=True),
            "attention": nn.MultiHeadDotProductAttention(num_heads=2)}[layer]
  if layer == "attention":
    x = x.reshape(2, 81, 8)
  fn, p = _layer(module, x)
  if layer == "batchnorm":  # non-trivial running statistics
    p = {"params": p["params"], "batch_stats": {"mean": _rand(8, seed=1),
                                                "var": np.abs(_rand(8, seed=2)) + 0.5}}
  _, sess = _convert(fn, x, p)
  for n in (1, 2, 5):  # a dynamic batch axis
    xn = _rand(n, *x.shape[1:], seed=n)
    np.testing.assert_allclose(onnx_export.run(sess, xn), np.asarray(fn(xn, p)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("int4", [True, False])
def test_activation_qdq_is_exactly_baqs_fake_quant(bits, symmetric, int4):
  """The QuantizeLinear/DequantizeLinear pair with a per-example scale gives
  baq's dynamic abs-max codes exactly (same float operations, ties to even)."""
  x = _rand(4, 6, 6, 5) * np.array([1, 3, 0.1, 10], np.float32)[:, None, None, None]
  fn = lambda x, p: fq.activation_fake_quant(x, bits, symmetric)  # noqa: E731
  m = graph.trace_to_onnx(fn, jax.ShapeDtypeStruct(x.shape, jnp.float32), {}, ops.HANDLERS,
                          onnx_model._marked(int4))
  q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
  assert len(q) == 1
  np.testing.assert_array_equal(onnx_export.run(onnx_export.session(m), x),
                                np.asarray(jax.jit(fn)(x, {})))


def test_code_types_are_the_narrowest_that_hold_codes_and_zero_point():
  T = onnx.TensorProto
  assert onnx_export.code_type(np.array([-7, 7]), np.zeros(1)) == T.INT4
  assert onnx_export.code_type(np.array([-7, 7]), np.zeros(1), int4=False) == T.INT8
  assert onnx_export.code_type(np.array([0, 15]), np.array([9])) == T.UINT4
  assert onnx_export.code_type(np.array([-31, 31]), np.zeros(1)) == T.INT8
  assert onnx_export.code_type(np.array([0, 255]), np.array([3])) == T.UINT8
  assert onnx_export.code_type(np.array([-32767, 32767]), np.zeros(1)) == T.INT16
  with pytest.raises(ValueError, match="fit no ONNX integer type"):
    onnx_export.code_type(np.array([-2**20, 2**20]), np.zeros(1))


def test_an_unsupported_primitive_names_itself_and_lists_the_supported():
  x = _rand(2, 4)
  with pytest.raises(NotImplementedError, match=r"'cumsum'.*Supported: abs, add"):
    _convert(lambda x, p: jnp.cumsum(x, axis=1), x)


def _deployed(name, size, granularity, act_bits=None, symmetric=True, seed=0,
              scale_method="mse", **kw):
  spec = QuantSpec(init_bits=4.0, granularity=granularity, act_bits=act_bits,
                   symmetric=symmetric, scale_method=scale_method)
  model = build_model(name, 3, Quantizer(((".*", spec),)), **kw)
  x = jax.random.normal(jax.random.key(seed), (3, size, size, 3))
  # jitted: eager, every initializer compiles on its own (seconds per model)
  v = dict(jax.jit(model.init)({"params": jax.random.key(1), "quant": jax.random.key(2)}, x))
  layers = units.find_units(v["params"])
  bits = np.random.default_rng(seed).uniform(2, 8, len(units.gather_bits(v["params"], layers)))
  params = units.scatter_bits(v["params"], layers, jnp.asarray(bits, jnp.float32))
  _, deployed = projection.deploy(params, layers, 4.0, 2, 8)
  v = dict(v, params=deployed)
  return model, v, np.asarray(x), _logits(model, v, x)


def _logits(model, v, x):
  """The deployed model's logits, jitted (eager, each op compiles on its own)."""
  deploy = model.clone(quant=model.quant.replace(mode=QuantMode.EVAL))
  return np.asarray(jax.jit(lambda v, x: apply_model(deploy, v, x))(v, x))


def _int_types(m):
  return {i.name: i.data_type for i in m.graph.initializer
          if i.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)}


@pytest.mark.parametrize("name,size,granularity,kw", [
    ("small_cnn", 16, "layer", dict(widths=(8, 16), hidden=16)),
    ("small_cnn", 16, "channel", dict(widths=(8, 16), hidden=16)),
    ("resnet8_cifar", 16, "channel", {}),
    # The large models with abs-max scales (the MSE scale search over their
    # millions of weights is most of the time; the small ones cover it), and
    # DeiT with 3 of its 12 identical blocks.
    ("resnet18", 32, "layer", dict(scale_method="absmax")),
    ("deit_tiny", 64, "layer", dict(patch_size=16, depth=3, scale_method="absmax")),
])
def test_weight_only_graph_reproduces_the_deployed_model(name, size, granularity, kw):
  """Integer initializers behind DequantizeLinear, at each unit's bits, give
  baq's deployed logits to float tolerance, at any batch size."""
  model, v, x, want = _deployed(name, size, granularity, **kw)
  captured = packed.capture_codes(model, v, x[:1])
  m = onnx_export.to_onnx(model, v, captured, x)
  dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
  assert len(dq) == len(captured)
  types = _int_types(m)
  for layer, rec in captured.items():
    b = int(np.max(rec["bits"]))
    code_inits = [t for k, t in types.items() if k.startswith(layer + "_") and
                  "zero_point" not in k]
    assert code_inits == [onnx.TensorProto.INT4 if b <= 4 else onnx.TensorProto.INT8], layer
  sess = onnx_export.session(m)
  np.testing.assert_allclose(onnx_export.run(sess, x), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(onnx_export.run(sess, x[:1]), want[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act_bits,symmetric", [(8, True), (4, True), (4, False)])
def test_activation_quantized_graph_agrees_up_to_boundary_codes(act_bits, symmetric):
  """With activations quantized, each pair is exact (test above), but a float
  difference of 1e-7 in a layer's output can move an activation that sits on
  a rounding boundary by one code in the next layer: logits agree to a few
  quantization steps and predictions almost always."""
  model, v, x, want = _deployed("small_cnn", 16, "channel", act_bits, symmetric,
                                widths=(8, 16), hidden=16)
  x = np.asarray(jax.random.normal(jax.random.key(5), (64,) + x.shape[1:]))
  want = _logits(model, v, x)
  captured = packed.capture_codes(model, v, x[:1])
  m = onnx_export.to_onnx(model, v, captured, x)
  assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == len(captured)
  got = onnx_export.run(onnx_export.session(m), x)
  assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))
  assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95


def test_metadata_carries_each_layers_bits():
  import json  # pylint: disable=import-outside-toplevel
  model, v, x, _ = _deployed("small_cnn", 16, "channel", widths=(8, 16), hidden=16)
  captured = packed.capture_codes(model, v, x[:1])
  m = onnx_export.to_onnx(model, v, captured, x, metadata={"allocation": {"avg_bits": 3.9}})
  props = {p.key: p.value for p in m.metadata_props}
  bits = json.loads(props["baq.bits"])
  assert set(bits) == set(captured)
  for layer, rec in captured.items():
    assert bits[layer] == np.asarray(rec["bits"]).astype(int).ravel().tolist()
  assert json.loads(props["baq.allocation"]) == {"avg_bits": 3.9}


def test_session_modes_exact_and_fold_keep_parity_and_unknown_modes_are_listed():
  model, v, x, want = _deployed("deit_tiny", 32, "layer", img_size=32, patch_size=16, depth=1)
  m = onnx_export.to_onnx(model, v, packed.capture_codes(model, v, x[:1]), x)
  for mode in ("exact", "fold"):
    np.testing.assert_allclose(onnx_export.run(onnx_export.session(m, mode=mode), x), want,
                               rtol=1e-4, atol=1e-5, err_msg=mode)
  # The runtime's default MatMulNBits arithmetic is not the deployed model's.
  assert np.max(np.abs(onnx_export.run(onnx_export.session(m, mode="default"), x) - want)) > 1e-5
  with pytest.raises(ValueError, match="Valid: exact, fold, default"):
    onnx_export.session(m, mode="fast")
