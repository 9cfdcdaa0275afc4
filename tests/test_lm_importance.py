"""Layer importance of a language model from group losses (`baq.allocation.lm_importance`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.allocation import lm_importance, planner
from baq.quant import gptq

LAYERS = ["block_0/attn/q_proj", "block_0/mlp/down_proj"]


def _problem():
  rng = np.random.default_rng(0)
  params = {"block_0": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(8, 6)),
                                                                  jnp.float32)}},
                        "mlp": {"down_proj": {"kernel": jnp.asarray(rng.normal(size=(6, 4)),
                                                                    jnp.float32)}}},
            "embed": {"embedding": jnp.ones((3, 8))}}
  x = jnp.asarray(rng.normal(size=(2, 32, 8)), jnp.float32)  # two groups' inputs

  def group_loss(p):
    h = jnp.tanh(x @ p["block_0"]["attn"]["q_proj"]["kernel"])
    out = h @ p["block_0"]["mlp"]["down_proj"]["kernel"]
    return jnp.mean(jnp.square(out - 1.0), axis=(1, 2)) * jnp.array([1.0, 3.0])

  return params, group_loss


def test_the_measured_loss_is_each_groups_loss_with_the_layer_rounded():
  params, group_loss = _problem()
  a = lm_importance.analyse(group_loss, params, LAYERS, measure="loss", choices=(2, 4))
  assert a.sensitivity.shape == (2, 2, 2) and a.units == LAYERS
  assert a.numel.tolist() == [48, 24]
  base = np.asarray(group_loss(params))
  w = params["block_0"]["mlp"]["down_proj"]["kernel"]
  p2 = jax.tree.map(lambda v: v, params)
  p2["block_0"]["mlp"]["down_proj"]["kernel"] = gptq.rtn(w, 2, grid="full")
  np.testing.assert_allclose(a.sensitivity[:, 1, 0], np.asarray(group_loss(p2)) - base,
                             rtol=1e-5, atol=1e-6)


def test_grad_weight_is_the_squared_first_order_term():
  params, group_loss = _problem()
  a = lm_importance.analyse(group_loss, params, LAYERS, measure="grad_weight", choices=(3,))
  w = params["block_0"]["attn"]["q_proj"]["kernel"]
  dw = gptq.rtn(w, 3, grid="full") - w
  grads = jax.jacrev(lambda k: group_loss(
      {**params, "block_0": {**params["block_0"], "attn": {"q_proj": {"kernel": k}}}}))(w)
  want = np.square(np.sum(np.asarray(grads) * np.asarray(dw)[None], axis=(1, 2)))
  np.testing.assert_allclose(a.sensitivity[:, 0, 0], want, rtol=1e-4)


def test_hessian_traces_approach_the_exact_trace():
  params, group_loss = _problem()
  a = lm_importance.analyse(group_loss, params, LAYERS[1:], measure="hessian", choices=(8,),
                            num_probes=64, probe_chunk=8)
  w = params["block_0"]["mlp"]["down_proj"]["kernel"]

  def loss_k(k):
    return group_loss({**params, "block_0": {**params["block_0"],
                                             "mlp": {"down_proj": {"kernel": k}}}})
  h = jax.hessian(loss_k)(w)  # [G, 6, 4, 6, 4]
  trace = np.einsum("gijij->g", np.asarray(h))
  dw = np.asarray(gptq.rtn(w, 8, grid="full") - w)
  want = 0.5 * trace / w.size * np.sum(dw ** 2)
  # The loss is quadratic in this kernel, so Rademacher probes estimate the trace
  # with the off-diagonal mass as their only noise.
  np.testing.assert_allclose(a.sensitivity[:, 0, 0], want, rtol=0.3)


def test_the_exact_allocator_meets_the_budget_on_the_analysis():
  params, group_loss = _problem()
  a = lm_importance.analyse(group_loss, params, LAYERS, measure="loss", choices=(2, 3, 4, 8))
  bits = planner.allocate(a, 3.0, reducer="max")
  assert (a.numel * bits).sum() / a.numel.sum() <= 3.0 + 1e-9
  with pytest.raises(ValueError, match="No kernel"):
    lm_importance.analyse(group_loss, params, ["block_1/attn/q_proj"], measure="loss")


def test_tied_layers_become_one_unit_with_summed_costs():
  params, group_loss = _problem()
  a = lm_importance.analyse(group_loss, params, LAYERS, measure="loss", choices=(2, 4, 8))
  t = lm_importance.tie(a, [tuple(LAYERS)])
  assert t.units == ["+".join(LAYERS)] and t.numel.tolist() == [72]
  np.testing.assert_allclose(t.sensitivity[:, 0], a.sensitivity.sum(1))
  untied = lm_importance.tie(a, [("block_0/attn/q_proj",)])
  assert untied.units == LAYERS
