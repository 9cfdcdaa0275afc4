"""The LM bias study end to end on the tiny config, its scoring and its refusals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.data.text import crows_pairs, tokenizer as tok
from baq.export import gptq_lm
from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.study.lm import study, evaluate as lm_eval, quant as lm_quant
from configs import lm as lm_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("lm"))
  c = lm_config.get_config("tiny")
  c.export = "gptq"
  return root, c, study.run_seed(c, root, 0)


def test_every_setting_is_scored_and_kept(finished):
  root, c, rows = finished
  assert list(rows) == ["fp32", "rtn@4", "gptq@4", "fair_gptq@4:a1", "mixed@3", "nf4"]
  for name, row in rows.items():
    assert 0 <= row["crows"] <= 100 and row["ppl"] > 1
    assert ("change" in row) == (name != "fp32")
    if name != "fp32":
      assert np.isclose(row["change"], row["crows"] - rows["fp32"]["crows"])
  assert rows["mixed@3"]["avg_bits"] <= 3.0 and rows["gptq@4"]["avg_bits"] == 4.0
  assert rows["nf4"]["avg_bits"] == 4.0 and rows["nf4"]["ppl"] != rows["fp32"]["ppl"]
  with open(os.path.join(root, "seed0", "results", "mixed@3.json")) as f:
    saved = json.load(f)
  bits = saved["info"]["bits"]
  assert set(bits.values()) <= {2, 3, 4, 8} and saved["info"]["groups"] == ["lm", "age", "gender"]
  assert all(saved["layers"][k]["bits"] == b for k, b in bits.items())
  # GPT-2 fuses q, k and v into c_attn: one unit, one bit-width.
  assert len({bits[f"block_0/attn/{p}_proj"] for p in "qkv"}) == 1
  assert "block_0/attn/q_proj+block_0/attn/k_proj+block_0/attn/v_proj" in saved["info"]["units"]
  assert "pair_err" in json.load(open(os.path.join(
      root, "seed0", "results", "fair_gptq@4_a1.json")))["layers"]["block_0/attn/q_proj"]


def test_each_setting_is_exported_as_a_gptq_checkpoint_that_loads_back(finished):
  root, c, rows = finished
  folder = os.path.join(root, "seed0", "gptq", "mixed@3")
  with open(os.path.join(folder, "quantize_config.json")) as f:
    qcfg = json.load(f)
  assert qcfg["quant_method"] == "gptq" and qcfg["sym"]
  model, variables, tokenizer, family = gptq_lm.load_gptq(folder)
  assert family == "gpt2" and tokenizer.get_vocab_size() == model.config.vocab_size
  x = jnp.asarray(tokenizer.encode("<bos> the nurse said that she would be late .").ids)[None]
  logits = model.apply(variables, x)
  assert np.isfinite(np.asarray(logits)).all()
  # The exported weights are the quantized model's: a fresh quantization of the same
  # setting gives the same logits up to float16 scales.
  texts = study.load_texts(c, root)
  built = study.build_model(c, texts, os.path.join(root, "seed0"), 0)
  calib = study.calibration(c, texts, built["tokenizer"], 0)
  fam = study.LM_FAMILIES.get("gpt2")
  q, _, _ = lm_quant.quantize("mixed@3", built["model"], built["params"], calib, c, 1,
                              list(fam.hf_modules(built["model"].config).values()))
  want = built["model"].apply({"params": q}, x)
  float_logits = built["model"].apply({"params": built["params"]}, x)
  gap = np.abs(np.asarray(logits) - np.asarray(want)).max()
  assert gap < 0.1 * np.abs(np.asarray(float_logits) - np.asarray(want)).max() + 1e-3


def test_a_finished_seed_is_reused_not_recomputed(finished, monkeypatch):
  root, c, rows = finished
  monkeypatch.setattr(lm_quant, "quantize", lambda *a, **k: pytest.fail("recomputed"))
  again = study.run_seed(c, root, 0)
  assert again == json.loads(json.dumps(rows))
  table = study.format_table({0: again})
  assert "fair_gptq@4:a1" in table and "SYNTHETIC" in table


def test_a_fixed_model_scores_what_sees_no_calibration_once_for_every_seed(
    finished, tmp_path, monkeypatch):
  """On a pre-trained model, RTN and the runtimes' numerics (no calibration)
  give the same scores for every seed: scored once, GPTQ once per seed."""
  root, c, _ = finished
  texts = study.load_texts(c, root)
  built = study.build_model(c, texts, os.path.join(root, "seed0"), 0)
  c = c.copy_and_resolve_references()
  c.model.source, c.export, c.seeds = "hf", "", (0, 1)  # a fixed model, as from a checkpoint
  c.quant.bits, c.quant.alphas, c.quant.budgets, c.quant.numerics = "4", "", "", "nf4"
  monkeypatch.setattr(study, "build_model", lambda *a: built)
  scored = []
  real = lm_eval.score
  monkeypatch.setattr(lm_eval, "score", lambda m, v, e: scored.append(m) or real(m, v, e))
  runs = study.run(c, str(tmp_path))
  assert len(scored) == 5  # fp32, rtn@4 and nf4 once; gptq@4 for each seed
  assert runs[0]["rtn@4"] == runs[1]["rtn@4"] and runs[0]["nf4"] == runs[1]["nf4"]
  assert runs[0]["gptq@4"]["ppl"] != runs[1]["gptq@4"]["ppl"]  # another calibration sample


def test_scores_are_the_models_log_likelihoods(tmp_path):
  sentences = ["the nurse said that she would be late .", "the pilot walked to the bank ."]
  t = tok.word_tokenizer(sentences)
  model = CausalLM(DecoderConfig(vocab_size=t.get_vocab_size(), d_model=16, n_layers=1,
                                 n_heads=2, d_ff=32, max_len=32, norm="layernorm",
                                 norm_eps=1e-5, positions="learned", mlp="gelu_tanh",
                                 tie_embeddings=True))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  path = tmp_path / "pairs.csv"
  path.write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n"
                  f"0,{sentences[0]},the nurse said that he would be late .,stereo,gender\n")
  pairs = crows_pairs.load_crows_pairs(str(path))
  enc = lm_eval.encode(pairs, None, sentences, t)
  s = lm_eval.score(model, params, enc)
  ids = tok.special_ids(t)
  x, n = tok.encode_batch(t, [sentences[0]], bos_id=ids["bos"], eos_id=ids["eos"])
  logp = jax.nn.log_softmax(model.apply(params, jnp.asarray(x))[0, :-1])
  want = float(sum(logp[j - 1, x[0, j]] for j in range(1, n[0])))
  np.testing.assert_allclose(s["ll_more"][0], want, rtol=1e-5)
  assert s["heldout_mask"].sum() == sum(len(z.split()) + 1 for z in sentences)


def test_bad_settings_are_refused_before_any_work():
  c = lm_config.get_config("tiny")
  c.quant.budgets = "9"
  with pytest.raises(ValueError, match=r"outside the allowed bits \[2, 8\]"):
    lm_quant.settings(c)
  c = lm_config.get_config("tiny")
  c.quant.choices = "2,5"
  with pytest.raises(ValueError, match="cannot be held by a GPTQ checkpoint"):
    lm_quant.settings(c)
  c = lm_config.get_config("tiny")
  c.quant.alphas = "-1"
  with pytest.raises(ValueError, match="alpha"):
    lm_quant.settings(c)
  c = lm_config.get_config("tiny")
  c.quant.numerics = "int3"
  with pytest.raises(KeyError, match="llm_int8"):
    lm_quant.settings(c)
  with pytest.raises(ValueError, match="Valid: hf, stories, tiny"):
    lm_config.get_config("huge")


def test_the_layer_analysis_is_computed_once_per_seed_and_reused(finished, monkeypatch):
  root, c, _ = finished
  texts = study.load_texts(c, root)
  seed_dir = os.path.join(root, "seed0")
  built = study.build_model(c, texts, seed_dir, 0)
  calib = study.calibration(c, texts, built["tokenizer"], 0)
  model, params = built["model"], built["params"]
  calls = []
  real = lm_quant.lm_importance.analyse
  monkeypatch.setattr(lm_quant.lm_importance, "analyse",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  fresh = {b: lm_quant.allocation(model, params, calib, c, b, 1) for b in (3.0, 4.0)}
  assert len(calls) == 2  # without a cache, each budget analyses again
  tmp_dir = os.path.join(root, "memo")
  cache = lm_quant.AnalysisCache(tmp_dir)
  memo = {b: lm_quant.allocation(model, params, calib, c, b, 1, cache=cache)
          for b in (3.0, 4.0, 2.5)}
  assert len(calls) == 3 and cache.computed == 1  # one analysis for three budgets
  assert len(os.listdir(os.path.join(tmp_dir, "analysis"))) == 1
  for b in (3.0, 4.0):
    assert memo[b] == fresh[b]  # the same bits and info as computed afresh
  resumed = lm_quant.AnalysisCache(tmp_dir)  # a resumed run reads the file back
  assert lm_quant.allocation(model, params, calib, c, 4.0, 1, cache=resumed) == fresh[4.0]
  assert len(calls) == 3 and resumed.computed == 0
  other = study.calibration(c, texts, built["tokenizer"], 1)  # another calibration sample
  lm_quant.allocation(model, params, other, c, 3.0, 1, cache=resumed)
  assert len(calls) == 4 and resumed.computed == 1  # another key: computed, not reused


def test_the_study_prints_a_progress_line_per_setting(finished, capsys):
  root, c, _ = finished
  c = c.copy_and_resolve_references()
  c.quant.budgets, c.quant.numerics, c.quant.alphas, c.export = "", "", "", ""
  os.remove(os.path.join(root, "seed0", "results", "gptq@4.json"))  # to be computed again
  study.run_seed(c, root, 0)
  out = [l for l in capsys.readouterr().out.splitlines() if " of 3 (" in l]
  assert [l.split(" (")[1].split(")")[0] for l in out] == ["fp32", "rtn@4", "gptq@4"]
  assert out[0].startswith("[lm] seed 0: setting 1 of 3 (fp32) done in ")
  assert "left" in out[0] and "CrowS" in out[0]
  assert "setting 2 of 3 (rtn@4) reused" in out[1]
  assert "done in" in out[2] and "about" not in out[2]  # the last: nothing left to estimate


def test_the_importance_group_losses_are_each_sentence_scored_alone():
  """group_loss_fn scores pairs in runs of similar length: the same numbers as
  scoring every sentence unpadded, one at a time."""
  from baq.ptq import decoder as gd
  cfg = DecoderConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=24)
  model = CausalLM(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)

  def tokens(n, lo, hi):
    lengths = rng.integers(lo, hi, n).astype(np.int32)
    ids = rng.integers(1, 20, (n, hi)).astype(np.int32)
    ids[np.arange(hi)[None] >= lengths[:, None]] = 0
    return gd.Tokens(ids, lengths)
  a, b, calib = tokens(11, 2, 24), tokens(11, 2, 24), tokens(5, 6, 12)
  types = np.array(["x", "y", "x", "x", "y", "z", "x", "y", "z", "z", "x"])
  fn, groups = lm_quant.group_loss_fn(model, lm_quant.Calibration(calib, (a, b), types))
  got = np.asarray(jax.jit(fn)(params))

  # One sentence at a time, at the full width (a causal model's first n logits
  # do not see what follows), its own n - 1 next-token log-likelihoods summed.
  logits = jax.jit(lambda x: model.apply({"params": params}, x[None])[0])

  def ll(ids):
    padded = np.zeros(cfg.max_len, np.int32)
    padded[:len(ids)] = ids
    logp = np.asarray(jax.nn.log_softmax(logits(jnp.asarray(padded))))
    return float(np.sum(logp[np.arange(len(ids) - 1), ids[1:]]))
  pair = np.array([np.logaddexp(0.0, ll(a.ids[i, :a.lengths[i]]) - ll(b.ids[i, :b.lengths[i]]))
                   for i in range(11)])
  nll = [-ll(calib.ids[i, :calib.lengths[i]]) for i in range(5)]
  want = [sum(nll) / float(np.sum(calib.lengths - 1))] + [pair[types == t].mean()
                                                            for t in ("x", "y", "z")]
  assert groups == ["lm", "x", "y", "z"]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert len(lm_quant._length_chunks(np.maximum(a.lengths, b.lengths))) == lm_quant.PAIR_CHUNKS
