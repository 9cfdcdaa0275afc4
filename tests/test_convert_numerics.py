"""The converted weights compute what the PyTorch models compute.

State dicts with torchvision's and timm's real names (the tables of
test_convert.py), filled with random numbers, are converted and run; the
ResNet stem, a whole DeiT forward pass and a TinyViT window attention are
compared with numpy re-implementations of torch's and timm's evaluation-mode
semantics (NCHW convolution, BatchNorm, LayerNorm, attention, exact GELU).
"""

import flax.traverse_util as tu
import numpy as np
from scipy.special import erf

from baq.models import convert
from test_convert import fill, target, timm_deit, timm_tinyvit, torchvision_resnet
from test_models import run


def _conv_nchw(x, w, stride, pad):
  """PyTorch's Conv2d (no bias, groups=1) in NCHW, as a direct sum."""
  n, _, h, wd = x.shape
  o, _, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  out = np.zeros((n, o, ho, wo))
  for a in range(kh):
    for b in range(kw):
      patch = xp[:, :, a:a + stride * ho:stride, b:b + stride * wo:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
  return out


def _capture(model, variables, x, paths):
  """Logits, and outputs of the named submodules, of an evaluation-mode pass."""
  logits, state = run(lambda v: model.apply(
      v, x, capture_intermediates=lambda m, _: "/".join(m.path) in paths,
      mutable=["intermediates"]), variables)
  flat = tu.flatten_dict(state.get("intermediates", {}), sep="/")
  return np.asarray(logits, np.float64), {
      p: np.asarray(flat[p + "/__call__"][0], np.float64) for p in paths}


def test_resnet_stem_matches_torch_semantics():
  sd = fill(torchvision_resnet(18), std=0.1)
  model, abstract = target("resnet18")
  variables = convert.convert("resnet18", sd, abstract)
  x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)  # NCHW
  _, got = _capture(model, variables, x.transpose(0, 2, 3, 1), ["stem_bn"])
  want = _conv_nchw(x.astype(np.float64), sd["conv1.weight"], 2, 3)
  c = (None, slice(None), None, None)
  want = ((want - sd["bn1.running_mean"][c]) / np.sqrt(sd["bn1.running_var"][c] + 1e-5)
          * sd["bn1.weight"][c] + sd["bn1.bias"][c])
  assert want.shape == (2, 64, 16, 16)
  np.testing.assert_allclose(got["stem_bn"].transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def _layer_norm(x, w, b, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def _linear(sd, name, x):
  return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _timm_vit(sd, x, patch, heads, depth):
  """timm VisionTransformer.forward (eval) in numpy, x in NCHW."""
  n, c, h, w = x.shape
  g = h // patch
  pw = sd["patch_embed.proj.weight"]
  tok = x.reshape(n, c, g, patch, g, patch)
  tok = np.einsum("ncipjq,dcpq->nijd", tok, pw).reshape(n, g * g, -1) + sd["patch_embed.proj.bias"]
  dim = tok.shape[-1]
  z = np.concatenate([np.broadcast_to(sd["cls_token"], (n, 1, dim)), tok], 1) + sd["pos_embed"]
  hd = dim // heads
  for i in range(depth):
    p = f"blocks.{i}"
    y = _layer_norm(z, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)
    qkv = _linear(sd, f"{p}.attn.qkv", y).reshape(n, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    a = _softmax(q @ k.swapaxes(-1, -2) * hd**-0.5)
    z = z + _linear(sd, f"{p}.attn.proj", (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, dim))
    y = _layer_norm(z, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)
    y = _linear(sd, f"{p}.mlp.fc1", y)
    z = z + _linear(sd, f"{p}.mlp.fc2", 0.5 * y * (1 + erf(y / np.sqrt(2))))
  z = _layer_norm(z, sd["norm.weight"], sd["norm.bias"], 1e-6)
  return _linear(sd, "head", z[:, 0])


def test_deit_forward_matches_timm_semantics():
  cfg = dict(img_size=32, patch_size=8, dim=48, depth=2)
  sd = fill(timm_deit(num_classes=10, img=32, patch=8, dim=48, depth=2), seed=2, std=0.2)
  model, abstract = target("deit_tiny", 10, size=32, **cfg)
  variables = convert.convert("deit_tiny", sd, abstract)
  x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
  got, _ = _capture(model, variables, x.transpose(0, 2, 3, 1), [])
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  want = _timm_vit(sd64, x.astype(np.float64), patch=8, heads=3, depth=2)
  assert want.shape == (2, 10) and np.std(want) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tinyvit_window_attention_matches_timm_semantics():
  cfg = dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), window_sizes=(7, 3))
  sd = fill(timm_tinyvit(10, dims=(16, 32), depths=(1, 1), heads=(1, 2), windows=(7, 3)),
            seed=4, std=0.3)
  model, abstract = target("tinyvit_5m", 10, size=32, **cfg)
  variables = convert.convert("tinyvit_5m", sd, abstract)
  x = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
  attn = "stages_1/blocks_0/attn"
  _, got = _capture(model, variables, x, [attn + "/norm", attn])
  # The 4x4 map is padded to 6x6: 2 images x 4 windows of 3x3 tokens.
  xn = got[attn + "/norm"]
  assert xn.shape == (8, 9, 32)
  p = "stages.1.blocks.0.attn"
  heads, hd = 2, 16
  q, k, v = np.split(_linear(sd, f"{p}.qkv", xn).reshape(8, 9, heads, 3 * hd).transpose(0, 2, 1, 3),
                     3, axis=-1)
  points = [(i, j) for i in range(3) for j in range(3)]
  offsets = {}
  idx = np.array([[offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets))
                   for b in points] for a in points])
  bias = sd[f"{p}.attention_biases"][:, idx]
  a = _softmax(q @ k.swapaxes(-1, -2) * hd**-0.5 + bias)
  want = _linear(sd, f"{p}.proj", (a @ v).transpose(0, 2, 1, 3).reshape(8, 9, 32))
  np.testing.assert_allclose(got[attn], want, rtol=1e-4, atol=1e-4)
