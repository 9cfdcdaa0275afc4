"""Block-by-block GPTQ / Fair-GPTQ over a causal LM (`baq.ptq.decoder`).

The decoder's grid is GPTQ's full one (`Options.grid`). The Hessians are
rebuilt here independently: the block's LayerNorm applied
in numpy to the embeddings (or to the previous quantized block's output),
x x^T summed over real tokens only; GPTQ on them must give the module's
kernels exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.quant import gptq
from baq.ptq import decoder as gd
from baq.ptq import decoder_group as gd_group

CFG = DecoderConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16,
                    norm="layernorm", norm_eps=1e-5, positions="learned", mlp="gelu_tanh",
                    attn_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def lm():
  model = CausalLM(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 13, 24).astype(np.int32)
  ids = rng.integers(4, 40, (24, 12)).astype(np.int32)
  ids[np.arange(12)[None] >= lengths[:, None]] = 0
  return model, params, gd.Tokens(ids, lengths)


def _layernorm(x, p, eps=1e-5):
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _hessian(x, mask):
  rows = x[mask]
  return 2.0 * rows.T @ rows / len(rows)


def _embed(model, params, tokens):
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens.ids),
                                method=CausalLM.embed))


def test_the_first_layers_are_gptq_on_the_real_tokens_inputs(lm):
  model, params, calib = lm
  q, rec = gd.quantize_decoder(model, {"params": params}, calib, bits=3)
  x = _layernorm(_embed(model, params, calib), params["block_0"]["attn_norm"])
  h = _hessian(x, calib.mask())
  for name in ("q_proj", "k_proj", "v_proj"):
    w = params["block_0"]["attn"][name]["kernel"]
    want = gptq.gptq(w, jnp.asarray(h, jnp.float32), 3, grid="full").weight
    np.testing.assert_allclose(q["block_0"]["attn"][name]["kernel"], want, atol=1e-5)
    assert rec[f"block_0/attn/{name}"]["rows"] == int(calib.lengths.sum())
  # Everything but the block projections is untouched.
  np.testing.assert_array_equal(q["embed"]["embedding"], params["embed"]["embedding"])
  np.testing.assert_array_equal(q["block_0"]["attn"]["q_proj"]["bias"],
                                params["block_0"]["attn"]["q_proj"]["bias"])


def test_a_later_block_sees_the_quantized_earlier_block(lm):
  model, params, calib = lm
  q, _ = gd.quantize_decoder(model, {"params": params}, calib, bits=3)
  h0 = _embed(model, params, calib)
  h1 = np.asarray(model.apply({"params": q}, jnp.asarray(h0), 0, method=CausalLM.run_block))
  x = _layernorm(h1, params["block_1"]["attn_norm"])
  w = params["block_1"]["attn"]["q_proj"]["kernel"]
  want = gptq.gptq(w, jnp.asarray(_hessian(x, calib.mask()), jnp.float32), 3,
                   grid="full").weight
  np.testing.assert_allclose(q["block_1"]["attn"]["q_proj"]["kernel"], want, atol=1e-5)
  # The float block's output gives a different Hessian, so the test can tell.
  h1_float = np.asarray(model.apply({"params": params}, jnp.asarray(h0), 0,
                                    method=CausalLM.run_block))
  other = _hessian(_layernorm(h1_float, params["block_1"]["attn_norm"]), calib.mask())
  assert np.abs(other - _hessian(x, calib.mask())).max() > 1e-4


def test_padding_tokens_change_nothing(lm):
  model, params, calib = lm
  ids = calib.ids.copy()
  ids[calib.mask() == 0] = 7  # other padding ids
  a, _ = gd.quantize_decoder(model, {"params": params}, calib, bits=3)
  b, _ = gd.quantize_decoder(model, {"params": params}, gd.Tokens(ids, calib.lengths), bits=3)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


def test_chunks_cut_to_their_rows_width_give_the_same_statistics(lm, monkeypatch):
  """Rows sorted by length, each chunk cut to its longest row (rounded up to the
  bucket): the sums x x^T (and of pair differences) equal full-width chunks'.

  End to end only the first block's kernels are compared: a later block's
  inputs differ by float rounding, which can move one GPTQ code a grid step
  and, through the error feedback, the codes after it.
  """
  model, params, calib = lm
  run = gd._block_runner(model)  # pylint: disable=protected-access
  grams = gd_group._grams  # pylint: disable=protected-access
  block = params["block_0"]
  h = _embed(model, params, calib)
  full = [(s, 12) for s in gd_group.chunks(24, 5)]
  monkeypatch.setattr(gd_group, "WIDTH_BUCKET", 2)
  order = np.argsort(calib.lengths, kind="stable")
  cut = gd_group.spans(calib.lengths[order], 5, 12)
  assert len({w for _, w in cut}) > 2 and min(w for _, w in cut) < 12  # it does cut
  for target in ("attn/q_proj", "mlp/down_proj"):
    want = grams(run, block, h, calib.mask(), target, full)
    got = grams(run, block, h[order], calib.mask()[order], target, cut)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())
    assert got[1] == want[1] == calib.lengths.sum()
  # The pairs' difference Gram: both sides cut to the longer one's width.
  pa, pb = _pairs()
  ha, hb = _embed(model, params, pa), _embed(model, params, pb)
  m = gd_group.pair_mask(pa, pb, "padded")
  want = grams(run, block, ha, m, "attn/v_proj", [(slice(0, 10), 12)], h_b=hb)
  (sa, sb), rows = gd._by_length(pa, pb, 3)  # pylint: disable=protected-access
  got = grams(run, block, _embed(model, params, sa), gd_group.pair_mask(sa, sb, "padded"),
              "attn/v_proj", rows, h_b=_embed(model, params, sb))
  assert min(w for _, w in rows) < 12
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())
  assert got[1] == want[1]
  # End to end, shuffled and cut: the first block, and every record's row counts.
  opts = gd.Options(alpha=0.5, batch_size=5)
  perm = np.random.default_rng(3).permutation(24)
  shuffled = gd.Tokens(calib.ids[perm], calib.lengths[perm])
  got, rec = gd.quantize_decoder(model, {"params": params}, shuffled, bits=3, pairs=(pa, pb),
                                 options=opts)
  monkeypatch.setattr(gd_group, "WIDTH_BUCKET", 16)
  want, rec_want = gd.quantize_decoder(model, {"params": params}, calib, bits=3, pairs=(pa, pb),
                                       options=opts)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5),
               got["block_0"], want["block_0"])
  for name, r in rec_want.items():
    if name != "_blocks":
      assert (rec[name]["rows"], rec[name].get("pair_rows")) == (r["rows"], r.get("pair_rows"))


def test_spans_cover_the_rows_at_their_longest_rounded_up():
  lengths = np.array([1, 3, 4, 9, 10, 30, 31, 33])
  got = gd_group.spans(lengths, 3, 40, bucket=8)
  assert got == [(slice(0, 3), 8), (slice(3, 6), 32), (slice(6, 8), 40)]


def _pairs(seed=1, unequal=True):
  rng = np.random.default_rng(seed)
  la = rng.integers(4, 11, 10).astype(np.int32)
  lb = (la + (rng.integers(-1, 2, 10) if unequal else 0)).clip(3, 12).astype(np.int32)
  a = rng.integers(4, 40, (10, 12)).astype(np.int32)
  b = a.copy()
  b[:, 2] = rng.integers(4, 40, 10)  # the pair differs in one word
  for ids, ln in ((a, la), (b, lb)):
    ids[np.arange(12)[None] >= ln[:, None]] = 0
  return gd.Tokens(a, la), gd.Tokens(b, lb)


@pytest.mark.parametrize("pair_rows,pair_norm", [("common", "pairs"), ("padded", "rows")])
def test_fair_gptq_adds_alpha_times_the_pair_difference_hessian(lm, pair_rows, pair_norm):
  model, params, calib = lm
  pa, pb = _pairs()
  opts = gd.Options(alpha=0.5, pair_rows=pair_rows, pair_norm=pair_norm)
  q, rec = gd.quantize_decoder(model, {"params": params}, calib, bits=3, pairs=(pa, pb),
                               options=opts)
  ln = params["block_0"]["attn_norm"]
  d = (_layernorm(_embed(model, params, pa), ln) - _layernorm(_embed(model, params, pb), ln))
  n = (np.minimum if pair_rows == "common" else np.maximum)(pa.lengths, pb.lengths)
  rows = d[np.arange(12)[None] < n[:, None]]
  m = len(pa.lengths) if pair_norm == "pairs" else len(rows)
  h = _hessian(_layernorm(_embed(model, params, calib), ln), calib.mask())
  h_fair = h + 0.5 * 2.0 * rows.T @ rows / m
  w = params["block_0"]["attn"]["v_proj"]["kernel"]
  want = gptq.gptq(w, jnp.asarray(h_fair, jnp.float32), 3, grid="full").weight
  np.testing.assert_allclose(q["block_0"]["attn"]["v_proj"]["kernel"], want, atol=1e-5)
  assert rec["block_0/attn/v_proj"]["pair_rows"] == len(rows) and rec["block_0/attn/v_proj"]["fair"]


def test_alpha_zero_with_pairs_is_gptq_bit_for_bit(lm):
  model, params, calib = lm
  a, _ = gd.quantize_decoder(model, {"params": params}, calib, bits=4)
  b, rec = gd.quantize_decoder(model, {"params": params}, calib, bits=4, pairs=_pairs(),
                               options=gd.Options(alpha=0.0))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert "pair_err" in rec["block_1/mlp/down_proj"]


def test_the_newton_update_is_the_reference_gradient_update(lm):
  model, params, calib = lm
  pa, pb = _pairs(unequal=False)
  opts = gd.Options(alpha=0.3, fair_update="newton", fair_layers=(r"block_0/attn/q_proj",))
  q, rec = gd.quantize_decoder(model, {"params": params}, calib, bits=4, pairs=(pa, pb),
                               options=opts)
  ln = params["block_0"]["attn_norm"]
  d = _layernorm(_embed(model, params, pa), ln) - _layernorm(_embed(model, params, pb), ln)
  rows = d[pa.mask()]
  h = _hessian(_layernorm(_embed(model, params, calib), ln), calib.mask())
  h_pair = 2.0 * rows.T @ rows / len(pa.lengths)
  w = np.asarray(params["block_0"]["attn"]["q_proj"]["kernel"], np.float64)
  w_new = w - np.linalg.solve(h + 0.01 * np.mean(np.diag(h)) * np.eye(32), 0.3 * h_pair @ w)
  want = gptq.gptq(jnp.asarray(w_new, jnp.float32), jnp.asarray(h, jnp.float32), 4,
                   grid="full").weight
  np.testing.assert_allclose(q["block_0"]["attn"]["q_proj"]["kernel"], want, atol=1e-5)
  assert "fair" not in rec["block_0/attn/k_proj"]  # only the selected layer is fair


def test_gptq_beats_round_to_nearest_and_rtn_is_rtn(lm):
  model, params, calib = lm
  bits = {n: (3 if "mlp" in n else 4) for n in gd.quantizable_layers(params, CFG.n_layers)}
  _, rec = gd.quantize_decoder(model, {"params": params}, calib, bits=bits)
  layers = [k for k in rec if not k.startswith("_")]
  assert len(layers) == 12 and len(rec["_blocks"]["seconds"]) == 2
  assert all(rec[k]["err"] < rec[k]["err_rtn"] for k in layers)
  assert rec["block_0/mlp/up_proj"]["bits"] == 3 and rec["block_0/attn/o_proj"]["bits"] == 4
  r, _ = gd.quantize_decoder(model, {"params": params}, calib, bits=3,
                             options=gd.Options(method="rtn"))
  w = params["block_1"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(r["block_1"]["mlp"]["down_proj"]["kernel"],
                                gptq.rtn(w, 3, grid="full"))


def test_bad_input_is_refused_before_any_work(lm):
  model, params, calib = lm
  v = {"params": params}
  with pytest.raises(ValueError, match="needs pairs"):
    gd.quantize_decoder(model, v, calib, options=gd.Options(alpha=0.1))
  pa, pb = _pairs()
  with pytest.raises(ValueError, match="one shape"):
    gd.quantize_decoder(model, v, calib, pairs=(pa, gd.Tokens(pb.ids[:5], pb.lengths[:5])))
  with pytest.raises(ValueError, match="unknown layers"):
    gd.quantize_decoder(model, v, calib, bits={"block_9/attn/q_proj": 4})
  with pytest.raises(ValueError, match=r"integer in \[2, 8\]"):
    gd.quantize_decoder(model, v, calib, bits=9)
  with pytest.raises(ValueError, match="Unknown pair_rows"):
    gd.Options(pair_rows="zip")
