"""The regularizer and importance-measure examples of docs/extending.md, taken out and run."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.fairness import regularizers
from baq.train import loop as trainer
from baq.experiment import checks as validate
from conftest import ROOT

MARKER = "<!-- regularizer-example -->"


@pytest.fixture(scope="module")
def example_module(tmp_path_factory):
  readme = open(os.path.join(ROOT, "docs", "extending.md")).read()
  block = re.search(r"```python\n(.*?)```", readme[readme.index(MARKER):], re.S).group(1)
  path = tmp_path_factory.mktemp("user")
  (path / "my_penalties.py").write_text(block)
  sys.path.insert(0, str(path))
  yield "my_penalties"
  sys.path.remove(str(path))
  sys.modules.pop("my_penalties", None)
  if "ema_worst" in regularizers.REGULARIZERS:
    regularizers.REGULARIZERS.unregister("ema_worst")


def _ctx(group_loss, present):
  g = jnp.asarray(group_loss, jnp.float32)
  return regularizers.PenaltyContext(
      g, jnp.ones_like(g), jnp.asarray(present), g, jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32),
      jnp.zeros(4, jnp.int32), jnp.float32(4.0), jnp.float32(4.0), jnp.int32(0))


def test_example_registers_and_penalises_the_running_worst_group(example_module, tiny_config):
  tiny_config.imports = example_module
  validate.import_extensions(tiny_config)
  reg = regularizers.build("ema_worst", decay=0.5)
  state = reg.init(3)
  value, state, m = reg.apply(_ctx([1.0, 3.0, 2.0], [True, True, True]), state)
  assert float(value) == 3.0 and float(m["worst_ema"]) == 3.0
  # Group 1 is absent now: its running loss is kept; the worst present group
  # by running loss is group 2 (EMA 0.5 * 2 + 0.5 * 2.5).
  value, state, _ = reg.apply(_ctx([1.0, 0.0, 2.5], [True, False, True]), state)
  assert float(value) == 2.5
  np.testing.assert_allclose(state, [1.0, 3.0, 2.25])
  grad = jax.grad(lambda g: reg.apply(_ctx(g, [True] * 3), state)[0])(jnp.array([1., 2., 3.]))
  np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0])


def test_example_trains_from_a_config(example_module, tmp_path, tiny_config, tiny_data):
  config = tiny_config
  config.imports = example_module
  config.penalties.ema_worst = dict(weight=0.5, decay=0.95)
  validate.validate(config)
  trainer.train(config, str(tmp_path / "run"), mode="baq", data=tiny_data, steps=4, lr=1e-3)
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [4]
  # A running worst-group cross-entropy: positive and finite, and in the loss.
  assert 0 < lines[0]["penalty/ema_worst"] < np.inf and 0 < lines[0]["ema_worst/worst_ema"] < np.inf


def test_unimportable_extension_is_named(tiny_config):
  tiny_config.imports = "no_such_module_xyz"
  with pytest.raises(ImportError, match="no_such_module_xyz"):
    validate.validate(tiny_config)


def test_readme_measure_example_registers_and_computes():
  """docs/extending.md's importance-measure example, run on toy statistics."""
  from baq.allocation import importance
  readme = open(os.path.join(ROOT, "docs", "extending.md")).read()
  marker = "<!-- measure-example -->"
  block = re.search(r"```python\n(.*?)```", readme[readme.index(marker):], re.S).group(1)
  try:
    exec(compile(block, "extending.md measure example", "exec"), {})  # pylint: disable=exec-used
    g = jnp.arange(24.0).reshape(2, 3, 4)
    dw = jnp.ones((3, 4)) * 0.5
    got = importance.evaluate_measure("grad_sq", importance.KernelStats(g), jnp.ones((3, 4)),
                                      [dw], per_channel=True)[1]
    np.testing.assert_allclose(got[..., 0], np.sum(np.asarray(g) ** 2 * 0.25, 1), rtol=1e-6)
  finally:
    if "grad_sq" in importance.MEASURES:
      importance.MEASURES.unregister("grad_sq")
