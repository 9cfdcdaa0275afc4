"""The drivers' progress lines: the estimate's arithmetic and the line's wording."""

import pytest

from baq import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_estimate_is_the_mean_unit_time_times_the_units_left():
  assert progress.estimate_left([4.0, 8.0], 5) == pytest.approx(30.0)
  assert progress.estimate_left([], 3) is None
  assert progress.estimate_left([2.0], 0) == 0.0


def test_seconds_are_written_in_the_unit_a_reader_wants():
  assert progress.format_seconds(41.4) == "41 s"
  assert progress.format_seconds(114) == "1.9 min"
  assert progress.format_seconds(2 * 3600 + 18 * 60) == "2.3 h"


def test_each_finished_unit_prints_its_line_and_the_time_left():
  clock, lines = FakeClock(), []
  p = progress.Progress("lm", 20, prefix="seed 0", printer=lines.append, clock=clock,
                        primary=True)
  clock.now += 21.0
  assert p.note("model ready") == "[lm] seed 0: model ready; 21 s elapsed"
  for took in (7.9, 6.0, 6.1):  # the note's 21 s belong to no setting: 6.67 s a setting
    clock.now += took
    p.done("gptq@4", extra="CrowS 30.00")
  assert lines[-1] == ("[lm] seed 0: setting 3 of 20 (gptq@4) done in 6.1 s; 41 s elapsed, "
                       "about 1.9 min left. CrowS 30.00")
  assert len(lines) == 4


def test_reused_units_do_not_count_towards_the_estimate():
  clock, lines = FakeClock(), []
  p = progress.Progress("sweep", 4, unit="run", printer=lines.append, clock=clock, primary=True)
  clock.now += 0.01
  p.done("seed0", reused=True)
  assert lines[-1] == "[sweep] run 1 of 4 (seed0) reused; 0 s elapsed"  # nothing timed yet
  clock.now += 60.0
  p.done("seed1")
  assert lines[-1].endswith("about 2.0 min left")  # 60 s a run, two left
  clock.now += 60.0
  p.done("seed2")
  clock.now += 60.0
  assert "left" not in p.done("seed3")  # the last one has nothing left to estimate


def test_only_process_zero_prints_and_a_loop_needs_a_unit():
  lines = []
  p = progress.Progress("vlm", 2, printer=lines.append, primary=False)
  p.done("nf4")
  assert lines == [] and p.index == 1
  with pytest.raises(ValueError, match="total=0"):
    progress.Progress("lm", 0)
