"""The studies' small trainer: exact resumption, the non-finite stop, refused settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.train import fit
from baq.train.checkpoint import Checkpointer

CFG = DecoderConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8,
                    norm="layernorm", norm_eps=1e-5, positions="learned", mlp="gelu_tanh",
                    tie_embeddings=True)


class _Interrupted(Exception):
  """Stands for a kill between two steps."""


def _data():
  rng = np.random.default_rng(0)
  return rng.integers(1, 20, (40, 8)).astype(np.int32), rng.integers(3, 9, 40).astype(np.int32)


def test_an_interrupted_run_resumes_exactly(tmp_path):
  ids, lengths = _data()
  model = CausalLM(CFG)
  cfg = fit.FitConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, save_every=6)
  straight, losses = fit.train_lm(model, ids, lengths, cfg, str(tmp_path / "a"))
  half = fit.FitConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, save_every=6)
  # Interrupt after 6 steps: a run of the same config stopped by an exception.
  real = fit.batch_indices

  def stop_at_6(cfg_, step, n):
    if step == 6:
      raise _Interrupted
    return real(cfg_, step, n)

  fit.batch_indices = stop_at_6
  try:
    with pytest.raises(_Interrupted):
      fit.train_lm(model, ids, lengths, half, str(tmp_path / "b"))
  finally:
    fit.batch_indices = real
  resumed, rest = fit.train_lm(model, ids, lengths, half, str(tmp_path / "b"))
  assert len(rest) == 6 and len(losses) == 12
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
  again, none = fit.train_lm(model, ids, lengths, half, str(tmp_path / "b"))
  assert none == []  # finished: loaded, not retrained
  jax.tree.map(np.testing.assert_array_equal, straight, again)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  params = {"w": jnp.ones((3,))}
  cfg = fit.FitConfig(steps=10, batch_size=2, lr=1e-2, warmup_steps=1, save_every=2)

  def loss(p, batch):  # finite until the batch flag turns on at step 5
    return jnp.where(batch > 0, jnp.nan, jnp.sum(p["w"] ** 2))

  with pytest.raises(FloatingPointError, match=r"step 5.*checkpoint \(step 4\) is intact"):
    fit.fit(params, loss, lambda rows: jnp.float32(flag.pop(0)), 10, cfg, str(tmp_path))
  state = {"step": jnp.int32(0), "params": params, "opt_state": fit.optimizer(cfg).init(params)}
  ck = Checkpointer(str(tmp_path), jax.eval_shape(lambda: state))
  assert ck.latest_step() == 4
  ck.close()


flag = [0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps must be >= 1"), ("lr", float("nan"), "lr must be finite"),
    ("lr", -1.0, "lr must be finite and > 0"), ("warmup_steps", 700, r"warmup_steps must be in")])
def test_impossible_settings_are_refused(field, value, match):
  with pytest.raises(ValueError, match=match):
    fit.FitConfig(**{field: value})
