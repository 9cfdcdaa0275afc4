"""The papers' models: published parameter counts, shapes, BatchNorm, bit gradients."""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.fairness import losses
from baq.models import build_model, get_converter, size_options
from baq.models.tinyvit import attention_bias_index
from baq.quant.inject import Quantizer, QuantSpec

# torchvision's and timm's own counts at 224x224 and 1000 classes. TinyViT-5M:
# timm reports 5.39M; the exact figure is `_tinyvit_count` below, summed from
# timm's tiny_vit.py module definitions (5,392,764).
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032, "deit_tiny": 5_717_416,
             "tinyvit_5m": 5_392_764}
# Conv + Dense layers, counted by hand: ResNet-18 1 + 8*2 + 3 downsample + fc;
# ResNet-50 1 + 16*3 + 4 + fc; DeiT patch + 12*(qkv, proj, fc1, fc2) + head;
# TinyViT 2 stem + 2*3 MBConv + 3*3 merging + 10*(qkv, proj, local, fc1, fc2) + head.
LAYERS = {"resnet18": 21, "resnet50": 54, "deit_tiny": 50, "tinyvit_5m": 68}
# Small variants that keep every kind of layer, for the compiled tests (XLA's
# CPU compile time grows with the number of distinct convolutions).
SMALL = {
    # Stage 1 has an identity shortcut, stage 2 a projection.
    "resnet18": dict(width=8, stage_sizes=(1, 1)),
    "resnet50": dict(width=8, stage_sizes=(1, 1)),
    "deit_tiny": dict(img_size=32, patch_size=8, dim=48, depth=1),
    # MBConv stage, then one attention stage: 32x32 -> 8 -> 4, and window 3
    # pads the 4x4 map to 2x2 windows.
    "tinyvit_5m": dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 4),
                       window_sizes=(7, 3)),
}
QUANT = Quantizer(((".*", QuantSpec(init_bits=4.5)),))
# RBG keys: XLA compiles threefry's random bits slowly on CPU (~1 s per
# initializer here), which would dominate these tests.
RNGS = {n: jax.random.key(i, impl="rbg") for i, n in enumerate(("params", "quant", "dropout"))}


# XLA:CPU options that cut compile time ~3x here; the numbers are unchanged.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False}


def run(fn, *args):
  """Calls `jax.jit(fn)` compiled with XLA's cheap settings (compiling dominates)."""
  return jax.jit(fn).lower(*args).compile(FAST)(*args)


def _flat(tree):
  return tu.flatten_dict(dict(tree))


def _tinyvit_count(dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), heads=(2, 4, 5, 10),
                   windows=(7, 7, 14, 7), classes=1000):
  """Parameters of timm's TinyVit, from its layer shapes (BN: weight + bias)."""

  def conv_bn(cin, cout, k, groups=1):
    return cout * (cin // groups) * k * k + 2 * cout

  def linear(cin, cout):
    return cin * cout + cout

  n = conv_bn(3, dims[0] // 2, 3) + conv_bn(dims[0] // 2, dims[0], 3)
  mid = 4 * dims[0]
  n += depths[0] * (conv_bn(dims[0], mid, 1) + conv_bn(mid, mid, 3, mid) + conv_bn(mid, dims[0], 1))
  for s in range(1, 4):
    d = dims[s]
    n += conv_bn(dims[s - 1], d, 1) + conv_bn(d, d, 3, d) + conv_bn(d, d, 1)
    attn = 2 * d + linear(d, 3 * d) + linear(d, d) + heads[s] * windows[s]**2
    mlp = 2 * d + linear(d, 4 * d) + linear(4 * d, d)
    n += depths[s] * (attn + conv_bn(d, d, 3, d) + mlp)
  return n + 2 * dims[3] + linear(dims[3], classes)


def test_tinyvit_reference_count():
  assert _tinyvit_count() == PUBLISHED["tinyvit_5m"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_float_param_count_matches_published(name):
  model = build_model(name, 1000, None)
  shapes = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, 224, 224, 3))))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))
  assert count == PUBLISHED[name]
  kernels = [k for k in _flat(shapes["params"]) if k[-1] == "kernel"]
  assert len(kernels) == LAYERS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_quantized_model_has_one_bits_leaf_per_layer(name):
  model = build_model(name, 1000, QUANT)
  shapes = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, 64, 64, 3))))
  flat = _flat(shapes["params"])
  bits = {k[:-2]: v for k, v in flat.items() if k[-1] == "bits"}
  kernels = {k[:-1]: v for k, v in flat.items() if k[-1] == "kernel"}
  assert len(bits) == LAYERS[name] and set(bits) == set(kernels)
  for layer, b in bits.items():  # per channel: one bit-width per output feature
    assert b.shape == (kernels[layer].shape[-1],), layer
  others = sum(int(np.prod(v.shape)) for k, v in flat.items() if k[-1] != "bits")
  if name != "deit_tiny":  # DeiT's position table follows img_size, not the input
    assert others == PUBLISHED[name]


def test_readable_layer_names():
  want = {"resnet18": ["stem_conv", "layer1_0/conv1", "layer2_0/downsample_conv", "head"],
          "resnet50": ["layer4_2/conv3", "layer3_0/downsample_bn"],
          "deit_tiny": ["blocks_3/attn/qkv", "blocks_11/mlp/fc2", "patch_embed", "head"],
          "tinyvit_5m": ["stages_2/blocks_5/attn/qkv", "stages_0/blocks_1/conv2/conv",
                         "stages_3/downsample/conv2/bn", "head_norm", "head"]}
  for name, layers in want.items():
    shapes = jax.eval_shape(lambda m=build_model(name, 10, None): m.init(
        RNGS, jnp.zeros((1, 64, 64, 3))))
    paths = {"/".join(k[:-1]) for k in _flat(shapes["params"])}
    assert set(layers) <= paths, (name, set(layers) - paths)


def random_variables(model, x, seed=0):
  """Variables shaped by `model.init` (traced only) and filled by numpy.

  Avoids compiling the initializers; BatchNorm and LayerNorm scales are 1
  (TinyViT's zero-initialised MBConv scale would block gradients) and
  bit-widths are fractional, 4.5.
  """
  shapes = jax.eval_shape(model.init, RNGS, x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf == "kernel":
      return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(s.dtype)
    const = {"bits": 4.5, "scale": 1.0, "var": 1.0, "mean": 0.0}.get(leaf)
    if const is not None:
      return np.full(s.shape, const, s.dtype)
    return rng.normal(0, 0.1, s.shape).astype(s.dtype)  # biases, tokens, tables

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_batchnorm_and_bit_gradients(name):
  x = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32)
  y = np.arange(4)
  for quant in (None, QUANT):  # evaluation-mode shapes, traced only
    m = build_model(name, 5, quant, **SMALL[name])
    assert jax.eval_shape(lambda m=m: m.apply(m.init(RNGS, x), x)).shape == (4, 5)

  model = build_model(name, 5, QUANT, **SMALL[name])
  variables = random_variables(model, x)
  params = variables["params"]
  stats = {k: v for k, v in variables.items() if k == "batch_stats"}

  def loss(p):
    out, new = model.apply({"params": p, **stats}, x, train=True, rngs=RNGS,
                           mutable=["batch_stats"])
    return jnp.mean(losses.cross_entropy(out, y)), (out, new)

  grads, (logits, new_stats) = run(jax.grad(loss, has_aux=True), params)
  assert logits.shape == (4, 5) and bool(jnp.all(jnp.isfinite(logits)))
  gbits = {k: np.asarray(v) for k, v in _flat(grads).items() if k[-1] == "bits"}
  assert len(gbits) == len([k for k in _flat(params) if k[-1] == "kernel"]) >= 6
  units = np.concatenate([g.ravel() for g in gbits.values()])
  assert all(np.any(g != 0) for g in gbits.values()), [k for k, g in gbits.items() if not g.any()]
  assert np.mean(units != 0) > 0.95
  if stats:  # one step of running averages moved every variance (means of
    # a 1x1 conv after a training-mode BatchNorm legitimately stay at zero)
    old, new = _flat(stats["batch_stats"]), _flat(new_stats["batch_stats"])
    moved = [not np.allclose(old[k], new[k]) for k in old if k[-1] == "var"]
    assert len(moved) >= 6 and all(moved)


def test_resnet_batchnorm_running_mean_uses_torch_momentum():
  model = build_model("resnet18", 3, None, width=8, stage_sizes=(1,))
  x = np.random.default_rng(0).normal(2.0, 1.0, (6, 32, 32, 3)).astype(np.float32)
  variables = run(model.init, RNGS, x)
  _, state = run(lambda v: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda m, _: m.name == "stem_conv"), variables)
  conv_out = state["intermediates"]["stem_conv"]["__call__"][0]
  np.testing.assert_allclose(state["batch_stats"]["stem_bn"]["mean"],
                             0.1 * np.mean(conv_out, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["stem_bn"]["var"],
                             0.9 + 0.1 * np.var(conv_out, axis=(0, 1, 2)), rtol=1e-4)


def test_deit_resizes_position_embedding_for_other_inputs():
  model = build_model("deit_tiny", 4, None, **SMALL["deit_tiny"])
  variables = run(model.init, RNGS, jnp.zeros((1, 32, 32, 3)))
  assert variables["params"]["pos_embed"].shape == (1, 1 + 16, 48)
  out = run(model.apply, variables, jnp.ones((2, 48, 48, 3)))  # a 6x6 patch grid
  assert out.shape == (2, 4) and bool(jnp.all(jnp.isfinite(out)))
  distilled = build_model("deit_tiny", 4, None, distilled=True, **SMALL["deit_tiny"])
  p = jax.eval_shape(distilled.init, RNGS, jnp.zeros((1, 32, 32, 3)))["params"]
  assert p["pos_embed"].shape == (1, 2 + 16, 48) and p["head_dist"]["kernel"].shape == (48, 4)


def test_tinyvit_bias_index_follows_offsets():
  idx, size = attention_bias_index(3)
  assert size == 9 and idx.shape == (9, 9)
  assert np.all(idx == idx.T) and np.all(np.diag(idx) == 0)
  # Points (0,0)-(1,2) and (2,2)-(1,0) share the offset (1, 2): one bias entry.
  assert idx[0, 5] == idx[8, 3] and len(set(idx[0])) == 9
  # 14x14 windows (TinyViT-5M's third stage): 196 offsets.
  assert attention_bias_index(14)[1] == 196


def test_dropout_and_droppath_only_in_training():
  model = build_model("deit_tiny", 3, None, drop_rate=0.5, drop_path_rate=0.5,
                      **SMALL["deit_tiny"])
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = run(model.init, RNGS, x)

  def both(v):
    rng = {"dropout": jax.random.key(9, impl="rbg")}
    return (model.apply(v, x, train=False, rngs=rng), model.apply(v, x, rngs=rng),
            model.apply(v, x, train=True, rngs=rng))

  a, b, c = run(both, variables)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_size_options_come_from_the_registry():
  assert size_options("deit_tiny", 64) == dict(img_size=64, patch_size=8)
  assert size_options("deit_tiny", 224) == dict(img_size=224, patch_size=16)
  assert size_options("small_cnn", 64) == dict(widths=(32, 64, 128), hidden=128)
  assert size_options("resnet18", 64) == size_options("tinyvit_5m", 64) == {}
  size_options("resnet50", 64)["width"] = 8  # a fresh dict each time
  assert size_options("resnet50", 64) == {}
  # DeiT sized for 64 px keeps an 8x8 patch grid: 1 + 64 position entries.
  model = build_model("deit_tiny", 3, None, **size_options("deit_tiny", 64))
  p = jax.eval_shape(model.init, RNGS, jnp.zeros((1, 64, 64, 3)))["params"]
  assert p["pos_embed"].shape == (1, 65, 192)
  for fn in (lambda: build_model("resnet19", 10), lambda: size_options("resnet19", 64)):
    with pytest.raises(KeyError, match="Unknown model 'resnet19'. Valid model names: .*resnet18"):
      fn()


def test_converter_lookup_names_the_valid_converters():
  assert get_converter("resnet18") == get_converter("resnet50")
  assert get_converter("deit_tiny").heads == ("head", "head_dist")
  # small_cnn has no pretrained weights: named as such, and not offered.
  with pytest.raises(KeyError, match="No converter for model 'small_cnn'. Valid converter names: "
                                     "(?!.*small_cnn).*resnet18"):
    get_converter("small_cnn")
  with pytest.raises(KeyError, match="Unknown converter 'vgg16'. Valid converter names: "):
    get_converter("vgg16")


@pytest.mark.parametrize("depth,layers,weights", [(8, 10, 77_360), (20, 22, 270_896)])
def test_cifar_resnets_have_the_papers_layout(depth, layers, weights):
  """6n+2 layers at 32 px: stem, 3 stages of n basic blocks at 16/32/64 channels, head."""
  from baq.models.resnet import cifar_resnet  # pylint: disable=import-outside-toplevel
  model = build_model(f"resnet{depth}_cifar", 10, QUANT)
  shapes = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, 32, 32, 3))))
  flat = _flat(shapes["params"])
  kernels = {k[:-1]: v.shape for k, v in flat.items() if k[-1] == "kernel"}
  assert len(kernels) == layers and sum(int(np.prod(s)) for s in kernels.values()) == weights
  n = (depth - 2) // 6
  assert kernels[("stem_conv",)] == (3, 3, 3, 16)
  assert kernels[(f"layer3_{n - 1}", "conv2")] == (3, 3, 64, 64)
  assert kernels[("layer2_0", "downsample_conv")] == (1, 1, 16, 32)
  assert ("layer1_0", "downsample_conv") not in kernels  # identity shortcut in stage 1
  assert jax.eval_shape(lambda: model.apply(jax.tree.map(jnp.zeros_like, shapes),
                                            jnp.zeros((2, 32, 32, 3)))).shape == (2, 10)
  with pytest.raises(ValueError, match="Valid: \\[8, 20, 32, 56\\]"):
    cifar_resnet(18, 10)
