"""The language-model study as two processes on localhost equals one process.

`python -m baq.study.lm` started as a two-process jax.distributed job (one
CPU device each) writes the summary of a one-process run, figure for figure,
and only process 0 prints the table. Helpers: test_entry_points.py.
"""

import json
import os

from test_entry_points import one_process, processes


def test_lm_study_as_two_processes_equals_one(tmp_path):
  # RTN and GPTQ: the study's steps (train, calibrate, quantize, score) in
  # a third of the tiny config's time; test_lm_study.py runs every setting.
  args = ["-m", "baq.study.lm", "--config=configs/lm.py:tiny", "--config.quant.alphas=",
          "--config.quant.budgets=", "--config.quant.numerics=", "--config.train.steps=20",
          "--config.train.save_every=10", "--config.data.num_train=600"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  out_one = one_process(args + [f"--workdir={one}"], devices=1)
  outs = processes(args + [f"--workdir={two}"])
  with open(os.path.join(one, "summary.json")) as f:
    a = json.load(f)
  with open(os.path.join(two, "summary.json")) as f:
    b = json.load(f)
  assert a == b and list(a["0"]) == ["fp32", "rtn@4", "gptq@4"] and a["0"]["fp32"]["ppl"] > 1
  table = [l for l in out_one.splitlines() if l.startswith("Mean +- std")]
  assert table and table[0] in outs[0] and table[0] not in outs[1]
