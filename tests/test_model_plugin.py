"""A model family is one new file: built, sized and converted with no other edit.

The test writes a tiny family (builder, size options and converter in one
module) outside baq, imports it by name as `config.imports` does, and uses it
through baq's own entry points. It also checks that baq's own family files
are found by discovery, not by imports in `baq/models/__init__.py`.
"""

import ast
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq import models
from baq.models import convert
from baq.quant.inject import Quantizer, QuantSpec
from conftest import ROOT
from test_models import RNGS

NAME, MODULE = "tinynet", "baq_plugin_tinynet"
MARKER = "<!-- model-example -->"
DOC = open(os.path.join(ROOT, "docs", "extending.md")).read()
# docs/extending.md's model-family example, the whole plug-in file.
PLUGIN = re.search(r"```python\n(.*?)```", DOC[DOC.index(MARKER):], re.S).group(1)
QUANT = Quantizer(((".*", QuantSpec(init_bits=4.5)),))
X = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
  """The plugin file on sys.path, imported by name; unregistered afterwards."""
  (tmp_path / f"{MODULE}.py").write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert NAME not in models.MODELS
  imports = f" {MODULE}, "  # as experiment.import_extensions reads config.imports
  for name in filter(None, (s.strip() for s in imports.split(","))):
    importlib.import_module(name)
  yield
  models.MODELS.unregister(NAME)
  sys.modules.pop(MODULE, None)
  assert NAME not in models.MODELS


def _bits(params):
  return {k[:-2]: v for k, v in tu.flatten_dict(dict(params)).items() if k[-1] == "bits"}


def test_plugin_builds_float_and_quantized(plugin):
  del plugin
  assert NAME in models.MODELS.names()
  float_model = models.build_model(NAME, 5)
  fp = jax.eval_shape(float_model.init, RNGS, X)["params"]
  assert fp["stem"]["kernel"].shape == (3, 3, 3, 4) and fp["head"]["kernel"].shape == (4, 5)
  assert not _bits(fp)
  qmodel = models.build_model(NAME, 5, QUANT, width=6)
  qvars = qmodel.init(RNGS, X)
  bits = _bits(qvars["params"])
  assert {k[0] for k in bits} == {"stem", "head"}
  assert bits[("stem",)].shape == (6,) and bits[("head",)].shape == (5,)
  assert all(np.all(np.asarray(b) == 4.5) for b in bits.values())
  logits = qmodel.apply(qvars, X)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))


def test_plugin_size_options(plugin):
  del plugin
  assert models.size_options(NAME, 64) == {"width": 8}
  model = models.build_model(NAME, 3, None, **models.size_options(NAME, 64))
  assert jax.eval_shape(model.init, RNGS, X)["params"]["stem"]["kernel"].shape == (3, 3, 3, 8)


def _torch_forward(sd, x):
  """The plugin net in numpy from PyTorch tensors: Conv2d(pad 1), ReLU, mean, Linear."""
  w, (_, h, wd, _) = sd["features.0.weight"], x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum("nhwc,oc->nhwo", xp[:, a:a + h, b:b + wd], w[:, :, a, b])
          for a in range(3) for b in range(3)) + sd["features.0.bias"]
  return np.maximum(y, 0).mean((1, 2)) @ sd["classifier.weight"].T + sd["classifier.bias"]


def test_plugin_converts_a_torch_state_dict(plugin):
  del plugin
  rng = np.random.default_rng(1)
  sd = {"features.0.weight": rng.normal(size=(4, 3, 3, 3)), "features.0.bias": rng.normal(size=4),
        "classifier.weight": rng.normal(size=(5, 4)), "classifier.bias": rng.normal(size=5)}
  sd = {k: v.astype(np.float32) for k, v in sd.items()}
  converted = {}
  for quant in (None, QUANT):
    model = models.build_model(NAME, 5, quant)
    converted[quant] = convert.convert(NAME, sd, model.init(RNGS, X))
    p = converted[quant]["params"]
    np.testing.assert_array_equal(p["head"]["kernel"], sd["classifier.weight"].T)
    np.testing.assert_array_equal(p["stem"]["kernel"],
                                  sd["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["stem"]["bias"], sd["features.0.bias"])
    np.testing.assert_array_equal(p["head"]["bias"], sd["classifier.bias"])
    assert len(_bits(p)) == (2 if quant else 0)
    assert all(np.all(np.asarray(b) == 4.5) for b in _bits(p).values())  # stay at init
  out = converted[None]
  np.testing.assert_allclose(models.build_model(NAME, 5).apply(out, X), _torch_forward(sd, X),
                             rtol=1e-4, atol=1e-4)
  back = convert.to_torch(NAME, out)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  with pytest.raises(ValueError, match=r"1 unused source keys \['features.1.weight'\]"):
    convert.convert(NAME, {**sd, "features.1.weight": np.zeros((4, 4))}, out)


FAMILY_FILES = {"cnn", "resnet", "vit", "tinyvit"}
SHARED = {"convert", "layers"}  # generic machinery and shared layers: no models


def _baq_models_imports(path):
  """Modules under baq.models that the file at `path` imports."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("baq.models"):
      found |= {node.module} if node.module != "baq.models" else {
          f"baq.models.{a.name}" for a in node.names if a.name in FAMILY_FILES | SHARED}
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("baq.models.")}
  return found


def test_family_files_are_discovered_not_imported():
  package = os.path.dirname(models.__file__)
  found = [m for m in pkgutil.iter_modules([package]) if not m.name.startswith("_")]
  assert {m.name for m in found if not m.ispkg} == FAMILY_FILES | SHARED
  # Other kinds of model, each with a registry of its own; discovery skips them.
  assert {m.name for m in found if m.ispkg} == {"lm", "clip"}
  # __init__ names no module of its own (a type-only import of KeyRules aside).
  init = ast.parse(open(os.path.join(package, "__init__.py")).read())
  runtime = [n for n in init.body if isinstance(n, (ast.Import, ast.ImportFrom))]
  assert not any(getattr(n, "module", "") and n.module.startswith("baq.models") for n in runtime)
  for f in FAMILY_FILES:  # no family reaches into another
    assert _baq_models_imports(os.path.join(package, f"{f}.py")) <= {
        "baq.models.convert", "baq.models.layers"}, f
  assert _baq_models_imports(os.path.join(package, "convert.py")) <= {"baq.models.layers"}
  code = ("import json, sys; import baq.models as m; "
          "before = sorted(k for k in sys.modules if k.startswith('baq.models.')); "
          "names = m.MODELS.names(); "
          "owners = {n: getattr(m.MODELS.get(n).build, 'func', m.MODELS.get(n).build).__module__ "
          "for n in names}; print(json.dumps(dict(before=before, owners=owners)))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = json.loads(subprocess.run([sys.executable, "-c", code], check=True, env=env,
                                     capture_output=True, text=True).stdout)
  assert result["before"] == []  # nothing imported before the first lookup
  owners = result["owners"]
  assert owners == {"small_cnn": "baq.models.cnn", "resnet18": "baq.models.resnet",
                    "resnet50": "baq.models.resnet", "deit_tiny": "baq.models.vit",
                    "tinyvit_5m": "baq.models.tinyvit",
                    **{f"resnet{d}_cifar": "baq.models.resnet" for d in (8, 20, 32, 56)}}
  assert {o.rsplit(".", 1)[1] for o in owners.values()} == FAMILY_FILES
