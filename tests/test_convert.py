"""The weight converter, on state dicts with torchvision's and timm's real names.

The expected keys and shapes are written out here from the two libraries'
naming rules (torchvision resnet.py, timm vision_transformer.py and
tiny_vit.py), independently of the converter's own tables, and filled with
random numbers. Every key must be consumed and every leaf filled, in the
right layout, from a dict or a weight file, and errors must name the unused
keys, unfilled leaves or missing reader library. test_convert_numerics.py runs
the converted models against numpy versions of torch's and timm's.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.models import build_model, convert
from baq.quant.inject import Quantizer, QuantSpec
from test_models import PUBLISHED, RNGS, run

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _bn(sd, name, c):
  for leaf in ("weight", "bias", "running_mean", "running_var"):
    sd[f"{name}.{leaf}"] = (c,)
  sd[f"{name}.num_batches_tracked"] = ()


def torchvision_resnet(depth, num_classes=1000, width=64, stages=None):
  """{key: shape} of torchvision's resnet{depth} (v1.5) state dict."""
  bottleneck = depth >= 50
  stages = stages or {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
  sd = {"conv1.weight": (width, 3, 7, 7)}
  _bn(sd, "bn1", width)
  cin = width
  for s, n in enumerate(stages):
    w = width * 2**s
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      if bottleneck:
        cout = 4 * w
        convs = [(w, cin, 1), (w, w, 3), (cout, w, 1)]
      else:
        cout = w
        convs = [(w, cin, 3), (w, w, 3)]
      for i, (o, c, k) in enumerate(convs, 1):
        sd[f"{p}.conv{i}.weight"] = (o, c, k, k)
        _bn(sd, f"{p}.bn{i}", o)
      if (s > 0 and b == 0) or cin != cout:
        sd[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
        _bn(sd, f"{p}.downsample.1", cout)
      cin = cout
  sd.update({"fc.weight": (num_classes, cin), "fc.bias": (num_classes,)})
  return sd


def timm_deit(num_classes=1000, img=224, patch=16, dim=192, depth=12):
  """{key: shape} of timm's deit_tiny_patch16_224 (class token only)."""
  sd = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + (img // patch)**2, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
  for i in range(depth):
    p = f"blocks.{i}"
    for name, o, c in (("attn.qkv", 3 * dim, dim), ("attn.proj", dim, dim),
                       ("mlp.fc1", 4 * dim, dim), ("mlp.fc2", dim, 4 * dim)):
      sd.update({f"{p}.{name}.weight": (o, c), f"{p}.{name}.bias": (o,)})
    for norm in ("norm1", "norm2"):
      sd.update({f"{p}.{norm}.weight": (dim,), f"{p}.{norm}.bias": (dim,)})
  sd.update({"norm.weight": (dim,), "norm.bias": (dim,),
             "head.weight": (num_classes, dim), "head.bias": (num_classes,)})
  return sd


def timm_tinyvit(num_classes=1000, dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                 heads=(2, 4, 5, 10), windows=(7, 7, 14, 7)):
  """{key: shape} of timm's tiny_vit_5m_224 (current timm: stages.N.downsample)."""
  sd = {}

  def conv_norm(name, o, c, k, groups=1):
    sd[f"{name}.conv.weight"] = (o, c // groups, k, k)
    _bn(sd, f"{name}.bn", o)

  conv_norm("patch_embed.conv1", dims[0] // 2, 3, 3)
  conv_norm("patch_embed.conv2", dims[0], dims[0] // 2, 3)
  for j in range(depths[0]):
    d, mid = dims[0], 4 * dims[0]
    conv_norm(f"stages.0.blocks.{j}.conv1", mid, d, 1)
    conv_norm(f"stages.0.blocks.{j}.conv2", mid, mid, 3, mid)
    conv_norm(f"stages.0.blocks.{j}.conv3", d, mid, 1)
  for s in range(1, len(dims)):
    d = dims[s]
    conv_norm(f"stages.{s}.downsample.conv1", d, dims[s - 1], 1)
    conv_norm(f"stages.{s}.downsample.conv2", d, d, 3, d)
    conv_norm(f"stages.{s}.downsample.conv3", d, d, 1)
    for j in range(depths[s]):
      p = f"stages.{s}.blocks.{j}"
      sd[f"{p}.attn.attention_biases"] = (heads[s], windows[s]**2)
      for name, o, c in (("attn.qkv", 3 * d, d), ("attn.proj", d, d),
                         ("mlp.fc1", 4 * d, d), ("mlp.fc2", d, 4 * d)):
        sd.update({f"{p}.{name}.weight": (o, c), f"{p}.{name}.bias": (o,)})
      for norm in ("attn.norm", "mlp.norm"):
        sd.update({f"{p}.{norm}.weight": (d,), f"{p}.{norm}.bias": (d,)})
      conv_norm(f"{p}.local_conv", d, d, 3, d)
  sd.update({"head.norm.weight": (dims[-1],), "head.norm.bias": (dims[-1],),
             "head.fc.weight": (num_classes, dims[-1]), "head.fc.bias": (num_classes,)})
  return sd


TABLES = {"resnet18": lambda: torchvision_resnet(18), "resnet50": lambda: torchvision_resnet(50),
          "deit_tiny": timm_deit, "tinyvit_5m": timm_tinyvit}


def fill(shapes, seed=0, std=1.0):
  """Random values: positive variances, norm weights near 1, zero counters."""
  rng, sd = np.random.default_rng(seed), {}
  for k, shape in shapes.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = np.array(0, np.int64)
    elif k.endswith("running_var"):
      sd[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif k.endswith("weight") and len(shape) == 1:
      sd[k] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      sd[k] = (std * rng.standard_normal(shape)).astype(np.float32)
  return sd


def target(name, num_classes=1000, quant=None, size=224, **kwargs):
  model = build_model(name, num_classes, quant, **kwargs)
  return model, jax.eval_shape(model.init, RNGS, jnp.zeros((1, size, size, 3)))


@pytest.mark.parametrize("name", sorted(TABLES))
def test_full_size_state_dict_is_consumed_and_fills_every_leaf(name):
  shapes = TABLES[name]()
  trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(BUFFERS))
  assert trainable == PUBLISHED[name]  # the tables themselves are right
  sd = fill(shapes)
  _, abstract = target(name)
  out = convert.convert(name, sd, abstract)  # raises on any unused key or unfilled leaf
  leaves = jax.tree.leaves(out)
  assert all(isinstance(v, jax.Array) for v in leaves)
  assert sum(v.size for v in leaves) == sum(v.size for k, v in sd.items()
                                            if not k.endswith("num_batches_tracked"))
  back = convert.to_torch(name, out)  # round trip to the PyTorch names and layouts
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_layouts_of_particular_tensors():
  sd = fill(torchvision_resnet(18))
  p = convert.convert("resnet18", sd, target("resnet18")[1])
  conv = sd["layer2.0.conv1.weight"]
  assert p["params"]["layer2_0"]["conv1"]["kernel"][1, 2, 7, 5] == conv[5, 7, 1, 2]
  assert p["params"]["layer3_0"]["downsample_conv"]["kernel"].shape == (1, 1, 128, 256)
  assert p["params"]["head"]["kernel"][100, 3] == sd["fc.weight"][3, 100]
  np.testing.assert_array_equal(p["batch_stats"]["layer4_1"]["bn2"]["var"],
                                sd["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(p["params"]["stem_bn"]["scale"], sd["bn1.weight"])

  sd = fill(timm_deit())
  p = convert.convert("deit_tiny", sd, target("deit_tiny")[1])["params"]
  qkv = sd["blocks.3.attn.qkv.weight"]
  assert p["blocks_3"]["attn"]["qkv"]["kernel"][17, 400] == qkv[400, 17]
  assert p["patch_embed"]["kernel"][4, 5, 2, 9] == sd["patch_embed.proj.weight"][9, 2, 4, 5]
  np.testing.assert_array_equal(p["pos_embed"], sd["pos_embed"])
  # Another image size: the 14x14 position grid is resized to 2x2, the class
  # token's entry kept.
  small = convert.convert("deit_tiny", sd, target("deit_tiny", img_size=32)[1])["params"]
  assert small["pos_embed"].shape == (1, 5, 192)
  np.testing.assert_array_equal(small["pos_embed"][0, 0], sd["pos_embed"][0, 0])

  sd = fill(timm_tinyvit())
  v = convert.convert("tinyvit_5m", sd, target("tinyvit_5m")[1])
  dw = v["params"]["stages_2"]["blocks_1"]["local_conv"]["conv"]["kernel"]
  assert dw.shape == (3, 3, 1, 160)
  assert dw[2, 1, 0, 9] == sd["stages.2.blocks.1.local_conv.conv.weight"][9, 0, 2, 1]
  np.testing.assert_array_equal(v["params"]["stages_2"]["blocks_5"]["attn"]["attention_biases"],
                                sd["stages.2.blocks.5.attn.attention_biases"])
  np.testing.assert_array_equal(v["params"]["head_norm"]["bias"], sd["head.norm.bias"])


SMALL_RESNET = dict(width=8, stages=(1, 1))


def _small_resnet(quant=None):
  model = build_model("resnet18", 10, quant, width=8, stage_sizes=(1, 1))
  return run(model.init, RNGS, jnp.zeros((1, 32, 32, 3)))


def test_errors_name_unused_keys_unfilled_leaves_and_heads():
  sd = fill(torchvision_resnet(18, num_classes=10, **SMALL_RESNET))
  init = _small_resnet()
  with pytest.raises(ValueError, match=r"1 unused source keys \['layer9.0.conv1.weight'\]"):
    convert.convert("resnet18", {**sd, "layer9.0.conv1.weight": np.zeros(3)}, init)
  missing = {k: v for k, v in sd.items() if not k.startswith("layer2.0.bn1.")}
  with pytest.raises(ValueError, match=r"4 unfilled .*bn1/bias.*batch_stats:layer2_0/bn1/var"):
    convert.convert("resnet18", missing, init)
  other = fill(torchvision_resnet(18, num_classes=1000, **SMALL_RESNET))
  mismatch = r"2 shape mismatches \['fc.weight \(1000, 16\) -> head/kernel needs \(16, 10\)'"
  with pytest.raises(ValueError, match=mismatch + ".*, 0 unfilled"):
    convert.convert("resnet18", other, init)
  # Fine-tuning on other classes: the head stays at init, the rest is loaded.
  out = convert.convert("resnet18", other, init, allow_head_mismatch=True)
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], init["params"]["head"]["kernel"])
  np.testing.assert_array_equal(out["params"]["stem_conv"]["kernel"],
                                other["conv1.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(KeyError, match="Valid converter names"):
    convert.convert("vgg16", sd, init)


def test_seeds_a_quantized_model_and_reads_files(tmp_path):
  sd = fill(torchvision_resnet(18, num_classes=10, **SMALL_RESNET))
  qinit = _small_resnet(Quantizer(((".*", QuantSpec(init_bits=5.0)),)))
  direct = convert.convert("resnet18", sd, qinit)  # bits leaves are not in a source
  finit = _small_resnet()
  converted = convert.convert("resnet18", sd, finit)
  merged = convert.merge(qinit, converted)
  for v in (direct, merged):
    layer = v["params"]["layer2_0"]["conv2"]
    np.testing.assert_array_equal(layer["kernel"],
                                  sd["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(layer["QuantConv_0"]["bits"], np.full(16, 5.0))
  with pytest.raises(ValueError, match="Source lacks"):
    convert.merge(qinit, {"params": {}})

  np.savez(tmp_path / "w.npz", **sd)
  from_file = convert.convert("resnet18", tmp_path / "w.npz", finit)
  wrapped = convert.convert("resnet18", {"model": {f"module.{k}": v for k, v in sd.items()}}, finit)
  for v in (from_file, wrapped):
    jax.tree.map(np.testing.assert_array_equal, v, converted)
  with pytest.raises(ValueError, match="Unknown weight file type"):
    convert.load_state_dict(tmp_path / "w.h5")


def _save_safetensors(sd, path):
  pytest.importorskip("safetensors.numpy").save_file(sd, str(path))


def _save_torch(sd, path):
  torch = pytest.importorskip("torch")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)


@pytest.mark.parametrize("ext,save", [(".safetensors", _save_safetensors), (".pth", _save_torch),
                                      (".pt", _save_torch)])
def test_reads_real_weight_files(tmp_path, ext, save):
  sd = fill(torchvision_resnet(18, num_classes=10, **SMALL_RESNET))
  save(sd, tmp_path / f"w{ext}")
  save({f"module.{k}": v for k, v in sd.items()}, tmp_path / f"dp{ext}")  # DataParallel's
  for name in ("w", "dp"):
    loaded = convert.load_state_dict(tmp_path / f"{name}{ext}")
    assert sorted(loaded) == sorted(sd)
    for k, v in sd.items():
      assert isinstance(loaded[k], np.ndarray) and loaded[k].dtype == v.dtype, k
      np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  finit = _small_resnet()
  jax.tree.map(np.testing.assert_array_equal, convert.convert("resnet18", tmp_path / f"w{ext}", finit),
               convert.convert("resnet18", sd, finit))


@pytest.mark.parametrize("ext,modules", [
    (".pth", ("torch",)), (".pt", ("torch",)), (".bin", ("torch",)),
    (".safetensors", ("safetensors", "safetensors.numpy"))])
def test_missing_reader_library_says_what_to_install(tmp_path, monkeypatch, ext, modules):
  for module in modules:  # None in sys.modules makes the import fail, installed or not
    monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(ImportError, match=f"pip install {modules[0]}"):
    convert.load_state_dict(tmp_path / f"w{ext}")
