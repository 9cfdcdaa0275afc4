"""The CLIP bias study end to end on the tiny config, and its refusals."""

import json
import os

import numpy as np
import pytest

from baq.study.vlm import study, quant as vlm_quant
from configs import vlm as vlm_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("vlm"))
  c = vlm_config.get_config("tiny")
  return root, c, study.run_seed(c, root, 0)


def test_every_quantizer_is_scored_against_full_precision(finished):
  root, c, runs = finished
  assert list(runs) == c.quantizers.split(",")
  fp = runs["fp32"]
  assert "cells" not in fp and fp["info"]["avg_bits"] == 32.0
  types = ["I", "II", "III", "IV", "V", "VI"]
  for name, r in runs.items():
    assert r["data"]["groups"] == {"skin_type": types} and r["data"]["title"] == "SYNTHETIC"
    zs = r["zero_shot"]["skin_type"]
    assert 0 <= zs["accuracy"] <= 1 and len(zs["group_accuracy"]) == 6
    assert set(r["retrieval"]) == {"skin_type"} and set(r["retrieval"]["skin_type"]) == {"10"}
    if name == "fp32":
      continue
    cells = r["cells"]
    assert {f"skin_type/{t}" for t in types} | {"max_skew@10/skin_type"} == set(cells)
    for g, t in enumerate(types):
      cell = cells[f"skin_type/{t}"]
      want = zs["group_accuracy"][g] - fp["zero_shot"]["skin_type"]["group_accuracy"][g]
      if cell["change"] is not None and not np.isnan(cell["change"]):
        assert np.isclose(cell["change"], 100 * want, atol=1e-6)
      assert cell["verdict"] in ("amplified", "reduced", "no change")
      assert cell["p_holm"] >= cell["p_mcnemar"] - 1e-12
  assert runs["mixed4"]["info"]["avg_bits"] <= 4.0
  assert set(runs["mixed4"]["info"]["bits"].values()) <= {2, 3, 4, 8}


def test_quantizers_change_the_model_and_full_precision_is_unchanged(finished):
  root, c, runs = finished
  again = study.run_seed(c, root, 0)  # reused from the results files
  assert json.dumps(again, sort_keys=True) == json.dumps(runs, sort_keys=True)
  summary = study.summarize({0: runs})
  assert set(summary["counts"]) == set(c.quantizers.split(",")) - {"fp32"}
  assert all(sum(v.values()) == 7 for v in summary["counts"].values())
  table = study.format_table({0: runs}, "10")
  assert "SYNTHETIC" in table and "llm_int8" in table and "skin_type: I, II, III" in table
  assert os.path.exists(os.path.join(root, "seed0", "report.json"))
  study.plot_verdicts(os.path.join(root, "verdicts.png"), {0: runs})
  assert os.path.getsize(os.path.join(root, "verdicts.png")) > 10_000


def test_bad_input_is_refused():
  with pytest.raises(KeyError, match="dynamic_int8"):
    vlm_quant.QUANTIZERS.get("int3")
  with pytest.raises(ValueError, match="Valid: tiny"):
    vlm_config.get_config("huge")
  c = vlm_config.get_config("tiny")
  c.retrieval_k = "100000"
  with pytest.raises(ValueError, match="larger than the gallery"):
    study.run_seed(c, "/tmp/never_written_baq_vlm", 0)
