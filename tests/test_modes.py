"""Quantization rules of the config (big_vision style) and the budget's bounds."""

import math

import pytest

from baq.train import modes
from baq.experiment import checks as validate
from configs import tiny


def test_rules_are_matched_in_order_float_layers_first():
  config = tiny.get_config()
  config.quant.float_layers = "head"
  config.quant.rules = (("Conv_0", {"granularity": "channel", "symmetric": False}),
                        ("Dense_.*", None), ("head", {"granularity": "channel"}))
  quantizer = modes.get_mode(config, "qat", 4).quantizer
  assert quantizer.spec_for("head") is None  # float_layers wins over the later rule
  assert quantizer.spec_for("Dense_0") is None
  conv0, conv1 = quantizer.spec_for("Conv_0"), quantizer.spec_for("Conv_1")
  assert (conv0.granularity, conv0.symmetric) == ("channel", False)
  assert (conv1.granularity, conv1.symmetric) == ("layer", True)
  # The mode's own settings reach every rule's spec.
  assert conv0.parametrization == conv1.parametrization == "fixed"
  assert conv0.init_bits == conv1.init_bits == 4


def test_a_rule_with_an_unknown_option_is_refused_with_the_valid_ones():
  config = tiny.get_config()
  config.quant.rules = (("Conv_0", {"granularty": "channel"}),)
  with pytest.raises(ValueError, match=r"unknown options \['granularty'\]. Valid: .*granularity"):
    modes.get_mode(config, "baq")


@pytest.mark.parametrize("target", [math.nan, math.inf])
def test_a_non_finite_budget_is_refused_before_anything_trains(target):
  config = tiny.get_config()
  config.quant.target_bits = target
  with pytest.raises(ValueError, match="not a finite number"):
    validate.validate(config)


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("finetune_lr", -1e-3),
                                         ("lr", math.nan)])
def test_a_non_positive_learning_rate_is_refused(field, value):
  config = tiny.get_config()
  config.optim[field] = value
  with pytest.raises(ValueError, match=f"optim.{field}=.* must be a positive finite"):
    validate.validate(config)
