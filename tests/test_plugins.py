"""A quantizer parametrization is one new file: registered, discovered and trained.

docs/extending.md's example file is written to a temporary directory and imported
by name, as `config.imports` does; nothing in baq changes. (The regularizer counterpart
is tests/test_readme_example.py, the model and dataset ones
tests/test_model_plugin.py and tests/test_dataset_plugin.py.)
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.quant import parametrizations, units
from baq.quant.inject import Dense, Quantizer, QuantSpec
from baq.train import modes, loop as trainer
from baq.experiment import checks as validate
from baq.train.checkpoint import restore_variables
from conftest import ROOT
from configs import tiny

MARKER = "<!-- parametrization-example -->"
DOC = open(os.path.join(ROOT, "docs", "extending.md")).read()
PLUGIN = re.search(r"```python\n(.*?)```", DOC[DOC.index(MARKER):], re.S).group(1)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
  (tmp_path / "my_parametrization.py").write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = tiny.get_config()
  config.imports = "my_parametrization"
  validate.import_extensions(config)
  yield config
  parametrizations.PARAMETRIZATIONS.unregister("ste_bits")
  sys.modules.pop("my_parametrization", None)


def _apply(parametrization, bits):
  quant = Quantizer(((".*", QuantSpec(init_bits=4.0, granularity="channel",
                                      parametrization=parametrization)),))
  layer = Dense(quant)(3)
  x = jax.random.normal(jax.random.key(0), (5, 7))
  variables = layer.init({"params": jax.random.key(1), "quant": jax.random.key(2)}, x)
  params = variables["params"]
  params["QuantDotGeneral_0"]["bits"] = bits
  f = lambda p: layer.apply({"params": p}, x, rngs={"quant": jax.random.key(3)})
  return f(params), jax.grad(lambda p: jnp.sum(f(p) ** 2))(params)["QuantDotGeneral_0"]["bits"]


def test_a_new_parametrization_file_quantizes_trains_bits_and_is_accepted_by_baq(plugin):
  bits = jnp.array([3.3, 4.6, 5.0])
  out, grad = _apply("ste_bits", bits)
  fixed, fixed_grad = _apply("fixed", bits)
  np.testing.assert_array_equal(out, fixed)  # forward: rounded bits, exactly
  assert np.all(np.asarray(fixed_grad) == 0) and np.all(np.asarray(grad) != 0)
  plugin.quant.parametrization = "ste_bits"
  assert modes.get_mode(plugin, "baq").train_bits


def test_baq_trains_with_the_new_parametrization(plugin, tiny_config, tiny_data, tiny_float_run,
                                                 tmp_path):
  tiny_config.quant.parametrization = "ste_bits"
  tiny_config.quant.finalize_fraction = 0.0  # keep the searched (continuous) bits
  run = trainer.train(tiny_config, str(tmp_path / "baq"), mode="baq", data=tiny_data,
                      steps=4, lr=tiny_config.optim.finetune_lr,
                      init_variables=restore_variables(tiny_float_run))
  bits = np.asarray(units.gather_bits(run.params, units.find_units(run.params)))
  assert np.all(np.isfinite(bits)) and np.any(bits != tiny_config.quant.target_bits)


def test_built_in_parametrizations_are_discovered_and_unknown_names_list_them():
  code = ("import sys; from baq.quant import parametrizations as p; "
          "assert 'baq.quant.parametrizations.diffq' not in sys.modules; "
          "print(p.PARAMETRIZATIONS.names())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "['diffq', 'diffq_ste', 'fixed', 'fracbits']"
  with pytest.raises(KeyError, match="Valid parametrization names: diffq, diffq_ste, fixed, fracbits"):
    QuantSpec(parametrization="fracbit")


def test_baq_refuses_a_parametrization_without_a_bit_gradient():
  config = tiny.get_config()
  config.quant.parametrization = "fixed"
  with pytest.raises(ValueError, match="gives them no gradient. Use one of: diffq, diffq_ste, fracbits"):
    modes.get_mode(config, "baq")
