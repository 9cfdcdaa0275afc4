"""The quantization-method registry: its grammar, its nominal bits, and one numeric
registered in one place reaching the main job and all three studies."""

import jax
import jax.numpy as jnp
import pytest

from baq import workdir as wd
from baq.experiment import runtime_baselines
from baq.experiment.checks import validate
from baq.models.clip.model import CLIP
from baq.models.lm import LM_FAMILIES
from baq.models.lm.decoder import CausalLM
from baq.quant import methods
from baq.quant.numerics import NUMERICS, Numeric
from baq.study.bias import cells as study_cells, runner
from baq.study.lm import quant as lm_quant, study as lm_study
from baq.study.vlm import quant as vlm_quant, study as vlm_study
from baq.train.modes import MODES
from configs import bias_study, lm as lm_config, tiny, vlm as vlm_config

NEW = "int6_test"


def test_parse_and_format_round_trip():
  m, bits, alpha = methods.parse("fair_gptq@4:a0.5")
  assert (m.name, m.kind, m.takes, m.alpha, bits, alpha) == ("fair_gptq", "ptq", "bits", True,
                                                             4.0, 0.5)
  assert methods.parse("mixed@3.5") == (methods.get("mixed"), 3.5, None)
  assert methods.parse("nf4") == (methods.get("nf4"), None, None)
  for text in ("rtn@2", "gptq@8", "fair_gptq@3:a0.1", "qat@16", "baq@3.25", "mixed@3:a10",
               "fair_static@4", "fp32", "llm_int8", "dynamic_int8", "fp4"):
    assert methods.format(*methods.parse(text)) == text
  assert methods.format("fair_gptq", 4.0, 1.0) == "fair_gptq@4:a1"  # canonical numbers
  assert methods.parse(methods.format("baq", 2.75)) == (methods.get("baq"), 2.75, None)


@pytest.mark.parametrize("text, match", [
    ("rtn@9", r"rtn's bits must be an integer in \[2, 8\]"),
    ("gptq@1", r"gptq's bits must be an integer in \[2, 8\]"),
    ("rtn@3.5", r"an integer in \[2, 8\]"),
    ("rtn@four", r"an integer in \[2, 8\]"),
    ("qat@17", r"qat's bits must be a number in \[1, 16\]"),
    ("baq@0.5", r"baq's budget must be a number in \[1, 16\]"),
    ("mixed@9", r"mixed's budget must be a number in \[2, 8\]"),
    ("gptq", r"gptq takes bits: write gptq@<bits>, the bits an integer in \[2, 8\]"),
    ("gptq@4:a1", "gptq takes no alpha; the methods with one: fair_gptq, mixed"),
    ("fair_gptq@4:a-1", "alpha '-1' must be finite and >= 0"),
    ("fair_gptq@4:anan", "must be finite"),
    ("nf4@4", r"nf4 takes no @bits \(a runtime's numerics: its code bits \(4\) come from"),
    ("llm_int8@8", r"its code bits \(8\)"),
    ("fp32@16", "fp32 takes no @bits"),
    ("rtn 4", "is not a setting"),
])
def test_every_error_names_its_bound(text, match):
  with pytest.raises(ValueError, match=match):
    methods.parse(text)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(KeyError, match="dynamic_int8, fair_gptq"):
    methods.parse("awq@4")
  with pytest.raises(ValueError, match="is derived"):
    methods.METHODS.unregister("nf4")
  with pytest.raises(KeyError, match="fp32, rtn, mixed, dynamic_int8, fp4"):
    vlm_quant.QUANTIZERS.parse("gptq@4")  # the CLIP study runs no GPTQ
  assert set(MODES.names()) - {"float"} <= set(methods.METHODS.names())  # fp32 is float's
  assert methods.of_kind("ptq") == ["fair_gptq", "gptq", "rtn"]


def test_stored_bits_are_what_the_kernels_are_stored_in():
  from baq.quant.numerics import ggml
  # q4_k rows of 256 are q4_k (4 bits + 144 bytes per 256 weights: 4.5 per weight);
  # rows of 64 fall back to q5_0 (5 + 0.5); rows of 172 stay F16.
  assert methods.stored_bits("q4_k", [(256, 8)]) == dict(code_bits=4.0, bits_per_weight=4.5)
  assert methods.stored_bits("q4_k", [(64, 8)]) == dict(code_bits=5.0, bits_per_weight=5.5)
  assert methods.stored_bits("q4_k", [(172, 8)]) == dict(code_bits=16.0, bits_per_weight=16.0)
  mix = methods.stored_bits("q4_k", [(64, 64), (172, 64)])  # numel-weighted
  assert mix["code_bits"] == pytest.approx((5 * 64 + 16 * 172) / (64 + 172))
  assert ggml.stored_type("q4_k", 64) == "q5_0"
  assert methods.stored_bits("q8_0", [(4096, 4)])["bits_per_weight"] == 8.5
  with pytest.raises(ValueError, match="numerics"):
    methods.stored_bits("gptq@4", [(64, 64)])


def test_nominal_bits_are_the_numerics_storage_bits():
  ggml = ["q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]
  assert methods.RUNTIMES.names() == NUMERICS.names() == ["dynamic_int8", "fp4", "llm_int8",
                                                          "nf4"] + ggml
  for name in NUMERICS.names():
    numeric = NUMERICS.get(name)
    assert methods.nominal_bits(name) == numeric.storage(4096, 4096, **numeric.options())[0]
  assert [methods.nominal_bits(n) for n in NUMERICS.names()] == [8.0, 4.0, 8.0, 4.0, 2.0, 3.0,
                                                                 4.0, 4.0, 4.0, 5.0, 5.0, 5.0,
                                                                 6.0, 8.0]
  assert methods.nominal_bits("fp32") == 32.0
  assert methods.nominal_bits("fair_gptq@3:a1") == 3.0
  assert methods.nominal_bits("mixed@3.5") == 3.5


def _int6_weight(w, *, per_channel=False):
  """Symmetric 6-bit codes (max |w| -> 31), dequantized."""
  scale = jnp.max(jnp.abs(w), axis=0 if per_channel else None, keepdims=True) / 31.0
  return jnp.clip(jnp.round(w / scale), -31, 31) * scale


def _int6_dot(x, w, *, per_channel=False, ste=False):
  del ste
  return x @ _int6_weight(w, per_channel=per_channel)


def _int6_storage(d_in, d_out, *, per_channel=False, **compute_options):
  del d_in, compute_options
  return 6.0, 32.0 * (d_out if per_channel else 1)  # dynamic_int8's scales, 6-bit codes


@pytest.fixture
def new_numeric():
  """A runtime numeric registered in NUMERICS alone (removed after the test)."""
  NUMERICS.register(NEW)(Numeric(NEW, True, _int6_dot, _int6_weight, "test", _int6_storage))
  yield NEW
  NUMERICS.unregister(NEW)
  assert NEW not in methods.METHODS


def test_a_numeric_registered_once_reaches_every_driver(new_numeric):
  assert methods.parse(new_numeric) == (methods.get(new_numeric), None, None)
  assert methods.get(new_numeric).kind == "numerics" and methods.nominal_bits(new_numeric) == 6

  # The main job: a baseline of config.baselines, its Dense codes at 6 bits.
  c = tiny.get_config()
  c.baselines = f"uniform4,{new_numeric},dynamic_int8"
  validate(c)
  assert wd.runtime_baselines(c) == [new_numeric, "dynamic_int8"] and wd.baseline_bits(c) == [4]
  sample = jnp.zeros((1, 16, 16, 3), jnp.float32)
  per_weight = {}
  for name in (new_numeric, "dynamic_int8"):
    qmodel = runtime_baselines.model(c, name, 2)
    variables = jax.eval_shape(lambda m=qmodel: m.init(jax.random.key(0), sample))
    per_weight[name] = runtime_baselines.storage(c, name, qmodel, variables,
                                                 sample)["bits_per_dense_weight"]
  # The same per-tensor scales, codes of 6 bits instead of 8.
  assert per_weight["dynamic_int8"] - per_weight[new_numeric] == pytest.approx(2.0)

  # The bias study: one cell per seed at the numeric's bits, computed as numerics.
  c = bias_study.get_config("tiny")
  c.study.quantizers = f"rtn,{new_numeric}"
  cells = [x for x in runner.grid(c) if x.quantizer == new_numeric]
  assert [(x.name, x.bits) for x in cells] == [(f"{new_numeric}_s{s}", 6.0) for s in c.seeds]
  assert study_cells.compute(new_numeric) is study_cells.numerics_cell

  # The LM study: a setting of quant.numerics, reported at its bits.
  c = lm_config.get_config("tiny")
  c.quant.numerics = f"nf4,{new_numeric}"
  lm_study.check(c)
  assert lm_quant.settings(c)[-2:] == ["nf4", new_numeric]
  lm = CausalLM(LM_FAMILIES.get("gpt2").config_from_hf(lm_study.gpt2_config(c, 16)))
  qmodel, info = lm_quant.numeric_setting(new_numeric, lm)
  assert info == dict(method=new_numeric, avg_bits=6.0)
  # Given the params, what the projections are stored in: this model's rows
  # are shorter than q4_k's blocks of 256, so llama.cpp stores them as q5_0.
  params = lm.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert max(lm.config.d_model, lm.config.d_ff) < 256
  _, info = lm_quant.numeric_setting("q4_k", lm, params)
  assert info["avg_bits"] == 5.0 and info["bits_per_weight"] == 5.5
  assert qmodel.quant.rules[0][1].numerics == new_numeric

  # The CLIP study: a quantizer, reported at its bits.
  c = vlm_config.get_config("tiny")
  c.quantizers = f"fp32,rtn4,{new_numeric},mixed4"
  vlm_study.check(c)
  clip = CLIP(vlm_quant.clip_config(c, 16, 15))
  qclip, _, info = vlm_quant.quantized(new_numeric, clip, {}, c, None)
  assert info == dict(avg_bits=6.0, layers=[])
  assert not vlm_quant.needs_calibration(new_numeric) and vlm_quant.needs_calibration("mixed4")
  assert qclip.quant.rules[0][1].numerics == new_numeric
  assert vlm_quant.parse("rtn4") == vlm_quant.parse("rtn@4") == (methods.get("rtn"), 4.0)
