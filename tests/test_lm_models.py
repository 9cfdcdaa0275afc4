"""baq's causal language models against an independent numpy reading of HF checkpoints.

Small random checkpoints of every family are written as Hugging Face
folders (config.json, safetensors, tokenizer.json) and loaded with
`hf.load`; their logits must match `lm_reference` (torch semantics in
numpy). Full-size key names and shapes are checked too (GPT-2 124M and
OPT-125m with random values; 7B models with zero-cost broadcast arrays),
as are the KV cache, scoring, generation, injected quantization and the
error messages.
"""

import json
import os

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from baq.models.lm import LM_FAMILIES, family_for_model_type, hf, scoring
from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.quant.inject import QuantMode, Quantizer, QuantSpec

import lm_reference as ref  # tests/ is on sys.path under pytest

V = 61
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)
CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                 activation_function="gelu_new"),
    "opt": dict(model_type="opt", vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32,
                do_layer_norm_before=True, activation_function="relu"),
    # GQA (2 kv heads for 4), untied head, a small base so positions matter.
    "llama": dict(model_type="llama", **SMALL, num_key_value_heads=2, rope_theta=500.0,
                  max_position_embeddings=64, tie_word_embeddings=False),
    # Llama 3 rope scaling over the 16 "original" positions; tied head.
    "llama3": dict(model_type="llama", **SMALL, tie_word_embeddings=True,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2": dict(model_type="qwen2", **SMALL, num_key_value_heads=2, rope_theta=1e6,
                  tie_word_embeddings=True, use_sliding_window=False),
    # Multi-query attention and a window (3) shorter than the sequences (8).
    "mistral": dict(model_type="mistral", **SMALL, num_key_value_heads=1, sliding_window=3),
}
TOKENS = np.random.default_rng(1).integers(0, V, (2, 8)).astype(np.int32)


def random_state_dict(cfg, seed=0, scale=0.3):
  """Random values for every key of `cfg`'s checkpoint; norm weights around 1."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in ref.state_dict_shapes(cfg).items():
    norm = len(shape) == 1 and key.endswith("weight")
    out[key] = (norm + scale * rng.standard_normal(shape)).astype(np.float32)
  return out


def tiny_tokenizer():
  vocab = {f"w{i}": i for i in range(V - 1)} | {"[UNK]": V - 1}
  tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


def write_folder(path, cfg, sd, shards=1):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  tiny_tokenizer().save(os.path.join(path, "tokenizer.json"))
  if shards == 1:
    save_file(sd, os.path.join(path, "model.safetensors"))
    return str(path)
  keys, weight_map = sorted(sd), {}
  for s in range(shards):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: sd[k] for k in keys[s::shards]}
    save_file(part, os.path.join(path, name))
    weight_map.update(dict.fromkeys(part, name))
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """One folder per configuration (qwen2 sharded, mistral stored in bfloat16)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  out = {}
  for name, cfg in CONFIGS.items():
    sd = random_state_dict(cfg, seed=len(out))
    stored = sd
    if name == "mistral":  # the reference sees the values bf16 keeps
      stored = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
      sd = {k: v.astype(np.float32) for k, v in stored.items()}
    path = write_folder(tmp_path_factory.mktemp(name), cfg, stored,
                        shards=3 if name == "qwen2" else 1)
    out[name] = (path, cfg, sd)
  return out


@pytest.fixture(scope="module")
def loaded(folders):
  return {name: hf.load(path) for name, (path, _, _) in folders.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_numpy_reference(folders, loaded, name):
  _, cfg, sd = folders[name]
  model, variables, tokenizer, family = loaded[name]
  assert family == {"gpt2": "gpt2", "opt": "opt"}.get(name, "llama")
  assert tokenizer.encode("w3 w7 zz").ids == [3, 7, V - 1]
  got = np.asarray(model.apply(variables, jnp.asarray(TOKENS)))
  want = ref.logits(sd, cfg, TOKENS)
  assert got.shape == (2, 8, V) and got.dtype == np.float32
  assert np.abs(want).max() > 1.0  # random weights large enough to test something
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_reference_features_are_exercised(folders):
  """The window, llama3 scaling and OPT's offset change the logits (so parity means something)."""
  _, cfg, sd = folders["mistral"]
  no_window = ref.logits(sd, dict(cfg, sliding_window=None), TOKENS)
  assert np.abs(no_window - ref.logits(sd, cfg, TOKENS)).max() > 1e-2
  _, cfg, sd = folders["llama3"]
  unscaled = ref.logits(sd, dict(cfg, rope_scaling=None), TOKENS)
  assert np.abs(unscaled - ref.logits(sd, cfg, TOKENS)).max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "qwen2"])
def test_round_trip_state_dict(folders, loaded, name):
  _, cfg, sd = folders[name]
  model, variables, _, family = loaded[name]
  fam = LM_FAMILIES.get(family)
  back = fam.from_params(fam.to_params(sd, model.config), model.config)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # The loaded (jax) params export to the same arrays as well.
  again = fam.from_params(variables["params"], model.config)
  assert all(np.array_equal(again[k], sd[k]) for k in sd)


GPT2_124M = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12, activation_function="gelu_new")
OPT_125M = dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12,
                ffn_dim=3072, num_attention_heads=12, max_position_embeddings=2048,
                word_embed_proj_dim=768, do_layer_norm_before=True)
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_scaling=None,
                 tie_word_embeddings=False)
MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096,
                  rope_theta=10000.0)
QWEN2_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                 use_sliding_window=False, sliding_window=32768, max_window_layers=21)


def _convert_and_check(cfg, sd):
  fam = LM_FAMILIES.get(family_for_model_type(cfg["model_type"]))
  dc = fam.config_from_hf(cfg)
  params = fam.to_params(sd, dc)
  hf.check_params(CausalLM(dc), params)  # raises on any missing, extra or mis-shaped leaf
  return fam, dc, params


@pytest.mark.parametrize("cfg", [GPT2_124M, OPT_125M], ids=["gpt2-124m", "opt-125m"])
def test_full_size_random_checkpoints(cfg):
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s, dtype=np.float32) for k, s in ref.state_dict_shapes(cfg).items()}
  if cfg["model_type"] == "gpt2":  # the causal-mask buffers of older GPT-2 files are skipped
    sd.update({f"transformer.h.{i}.attn.bias": np.zeros((1, 1, 4, 4), np.float32)
               for i in range(12)})
  fam, dc, params = _convert_and_check(cfg, sd)
  n = sum(np.size(v) for v in jax.tree.leaves(params))
  assert n == {"gpt2": 124_439_808, "opt": 125_239_296}[cfg["model_type"]]
  back = fam.from_params(params, dc)
  assert all(np.array_equal(back[k], sd[k]) for k in back) and len(back) == len(sd) - (
      12 if cfg["model_type"] == "gpt2" else 0)


@pytest.mark.parametrize("cfg", [LLAMA2_7B, MISTRAL_7B, QWEN2_05B],
                         ids=["llama2-7b", "mistral-7b", "qwen2-0.5b"])
def test_full_size_names_and_shapes(cfg):
  # Random 7B values do not fit in memory (28 GB in float32): zero-cost
  # broadcast arrays carry the real names and shapes through the converter,
  # which only takes views, and the check compares shapes with eval_shape.
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in ref.state_dict_shapes(cfg).items()}
  fam, dc, params = _convert_and_check(cfg, sd)
  n = sum(np.size(v) for v in jax.tree.leaves(params))
  assert n == {"llama": 6_738_415_616, "mistral": 7_241_732_096, "qwen2": 494_032_768}[
      cfg["model_type"]]
  assert dc.sliding_window == (4096 if cfg["model_type"] == "mistral" else None)
  back = fam.from_params(params, dc)
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items()}


def _apply(model, variables, *args, **kwargs):
  return np.asarray(model.apply(variables, *args, **kwargs))


@pytest.mark.parametrize("name", ["opt", "mistral"])
def test_block_by_block_equals_forward(loaded, name):
  """embed -> run_block(i) -> head, as GPTQ runs the model, is the forward pass."""
  model, variables, _, _ = loaded[name]
  tokens = jnp.asarray(TOKENS)
  h = model.apply(variables, tokens, method=CausalLM.embed)
  for i in range(model.config.n_layers):
    h = model.apply(variables, h, i, method=CausalLM.run_block)
  np.testing.assert_allclose(_apply(model, variables, h, method=CausalLM.head),
                             _apply(model, variables, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_cached_decoding_matches_full_forward(loaded, name):
  model, variables, _, _ = loaded[name]
  tokens = jnp.asarray(TOKENS)
  full = _apply(model, variables, tokens)
  # A prefill of 5 tokens, then one token a step (the mistral window of 3 slides).
  cache = model.init_cache(2, 8)
  logits, cache = model.apply(variables, tokens[:, :5], cache, method="decode")
  steps = [np.asarray(logits)]
  for j in range(5, 8):
    logits, cache = model.apply(variables, tokens[:, j:j + 1], cache, method="decode")
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
  assert int(cache["index"]) == 8 and cache["layers"][0]["k"].shape == (
      2, 8, model.config.n_kv_heads, model.config.head_dim)
  with pytest.raises(ValueError, match="Cache overflow"):
    model.apply(variables, tokens[:, :1], cache, method="decode")


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_generate_greedy_equals_argmax_without_cache(loaded, name):
  model, variables, _, _ = loaded[name]
  prompt = TOKENS[:, :4]
  out = np.asarray(scoring.generate(model, variables, prompt, 4))
  seq = prompt
  for _ in range(4):
    nxt = _apply(model, variables, jnp.asarray(seq))[:, -1].argmax(-1)
    seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
  np.testing.assert_array_equal(out, seq)
  # Sampling: reproducible from its key, and a tiny temperature is greedy.
  key = jax.random.key(3)
  s1 = scoring.generate(model, variables, prompt, 4, greedy=False, rng=key)
  s2 = scoring.generate(model, variables, prompt, 4, greedy=False, rng=key)
  np.testing.assert_array_equal(s1, s2)
  cold = scoring.generate(model, variables, prompt, 4, greedy=False, rng=key, temperature=1e-4)
  np.testing.assert_array_equal(cold, seq)


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "mistral"])
def test_left_padding_gives_the_unpadded_logits(folders, loaded, name):
  model, variables, _, _ = loaded[name]
  _, cfg, sd = folders[name]
  pad = 3  # row 0: three pads then TOKENS[0]; row 1: one pad then ten tokens
  longer = np.random.default_rng(7).integers(0, V, (1, 8 + pad - 1)).astype(np.int32)
  padded = np.stack([np.r_[np.zeros(pad, np.int32), TOKENS[0]], np.r_[0, longer[0]]])
  mask = np.arange(8 + pad)[None] >= np.array([[pad], [1]])
  got = _apply(model, variables, jnp.asarray(padded), attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(got[0, pad:], _apply(model, variables, jnp.asarray(TOKENS[:1]))[0],
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got[1, 1:], _apply(model, variables, jnp.asarray(longer))[0],
                             atol=2e-5, rtol=1e-5)
  # HF's own semantics with a padding mask (positions from the mask) agree too.
  want = ref.logits(sd, cfg, padded, attention_mask=mask)
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=1e-4)
  # Generation from the left-padded prompt continues as from the unpadded one.
  out = scoring.generate(model, variables, padded[:1], 3, prompt_mask=mask[:1])
  np.testing.assert_array_equal(np.asarray(out)[:, pad:],
                                scoring.generate(model, variables, TOKENS[:1], 3))


def test_token_log_probs(loaded):
  model, variables, _, _ = loaded["qwen2"]
  tokens = np.random.default_rng(5).integers(0, V, (5, 7)).astype(np.int32)
  lengths = np.array([7, 3, 1, 5, 2])
  got = np.asarray(scoring.token_log_probs(model, variables, tokens, lengths))
  logp = np.asarray(jax.nn.log_softmax(_apply(model, variables, jnp.asarray(tokens)), -1))
  want = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  real = np.arange(1, 7)[None] < lengths[:, None]
  assert got.shape == (5, 6)
  np.testing.assert_allclose(got[real], want[real], atol=1e-5)
  assert np.all(got[~real] == 0.0) and np.all(got[real] < 0)
  # Padding contributes nothing: other pad tokens give the same scores.
  noisy = np.where(np.arange(7)[None] < lengths[:, None], tokens, (tokens + 11) % V)
  np.testing.assert_allclose(scoring.token_log_probs(model, variables, noisy, lengths), got,
                             atol=1e-6)
  chunked = scoring.token_log_probs(model, variables, tokens, lengths, batch_size=2)
  np.testing.assert_allclose(chunked, got, atol=1e-6)
  ll = scoring.sequence_log_likelihood(model, variables, tokens, lengths, batch_size=3)
  np.testing.assert_allclose(ll, got.sum(-1), atol=1e-5)
  assert ll[2] == 0.0  # a single token has no conditional to score
  jitted = jax.jit(lambda v, t, n: scoring.sequence_log_likelihood(model, v, t, n, batch_size=2))
  np.testing.assert_allclose(jitted(variables, tokens, lengths), ll, atol=1e-5)


def _quantizer(bits):
  spec = QuantSpec(init_bits=bits, min_bits=2, granularity="channel", parametrization="fixed")
  return Quantizer(rules=((r"block_\d+/(attn|mlp)/.*", spec),), mode=QuantMode.EVAL)


def test_quantization_is_injected(folders):
  path, _, _ = folders["llama"]
  model, variables, _, _ = hf.load(path)
  float_logits = _apply(model, variables, jnp.asarray(TOKENS))
  q_model, q_vars, _, _ = hf.load(path, quant=_quantizer(8))
  flat = tu.flatten_dict(q_vars["params"], sep="/")
  bits = {k.rsplit("/", 2)[0]: v for k, v in flat.items() if k.endswith("/bits")}
  layers = [f"block_{i}/{m}" for i in range(2) for m in (
      "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
      "mlp/up_proj", "mlp/down_proj")]
  assert sorted(bits) == sorted(layers)  # not the embedding, norms or lm_head
  for layer in layers:
    assert bits[layer].shape == (flat[f"{layer}/kernel"].shape[-1],)
    np.testing.assert_array_equal(bits[layer], 8.0)
  # The float leaves are the checkpoint's, untouched by the quantizer.
  for k, v in tu.flatten_dict(variables["params"], sep="/").items():
    np.testing.assert_array_equal(flat[k], v)
  rel = lambda g: np.sqrt(np.mean((g - float_logits)**2) / np.mean(float_logits**2))
  err8 = rel(_apply(q_model, q_vars, jnp.asarray(TOKENS)))
  q2_model, q2_vars, _, _ = hf.load(path, quant=_quantizer(2))
  err2 = rel(_apply(q2_model, q2_vars, jnp.asarray(TOKENS)))
  # 8 bits: 0.6 % noise per kernel, ~2 % on these random (untrained) logits.
  assert 0 < err8 < 0.05 and err2 > 0.5 and err2 > 10 * err8, (err8, err2)


def test_missing_files_are_named(folders, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load(str(tmp_path))
  path, cfg, sd = folders["qwen2"]
  broken = tmp_path / "broken"
  write_folder(broken, cfg, sd, shards=3)
  os.remove(broken / "model-00002-of-00003.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
    hf.load(str(broken))
  os.remove(broken / "model.safetensors.index.json")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.read_state_dict(str(broken))


def test_unknown_model_type_lists_valid_ones(tmp_path):
  write_folder(tmp_path, {"model_type": "bert"}, {"x": np.zeros(2, np.float32)})
  with pytest.raises(KeyError, match="'bert'.*gpt2, llama, mistral, opt, qwen2"):
    hf.load(str(tmp_path))
  assert family_for_model_type("qwen2") == "llama"


@pytest.mark.parametrize("field,value,match", [
    ("n_kv_heads", 3, "n_kv_heads"), ("norm", "batchnorm", "norm must be one of"),
    ("d_model", 30, "d_model"), ("sliding_window", 0, "sliding_window"),
    ("mlp", "tanh", "mlp"), ("norm_eps", 0.0, "norm_eps"), ("vocab_size", 0, "vocab_size")])
def test_bad_decoder_config_names_the_field(field, value, match):
  base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=8)
  with pytest.raises(ValueError, match=match):
    DecoderConfig(**dict(base, **{field: value}))


@pytest.mark.parametrize("name,field,value", [
    ("opt", "do_layer_norm_before", False), ("opt", "word_embed_proj_dim", 16),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True), ("gpt2", "reorder_and_upcast_attn", True),
    ("llama", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("qwen2", "use_sliding_window", True), ("llama", "hidden_act", "gelu")])
def test_unsupported_configs_are_refused(name, field, value):
  cfg = dict(CONFIGS[name], **{field: value})
  fam = LM_FAMILIES.get(family_for_model_type(cfg["model_type"]))
  with pytest.raises(ValueError, match=field):
    fam.config_from_hf(cfg)


def test_checkpoint_mismatches_are_named(folders, tmp_path):
  _, cfg, sd = folders["gpt2"]
  bad = dict(sd, **{"transformer.wte.weight": np.zeros((V - 1, 32), np.float32)})
  write_folder(tmp_path / "shape", cfg, bad)
  with pytest.raises(ValueError, match=r"embed/embedding: checkpoint \(60, 32\) vs model "
                                       r"\(61, 32\)"):
    hf.load(str(tmp_path / "shape"))
  write_folder(tmp_path / "extra", cfg, dict(sd, **{"transformer.h.0.extra.weight": sd[
      "transformer.ln_f.weight"]}))
  with pytest.raises(ValueError, match=r"h\.0\.extra\.weight"):
    hf.load(str(tmp_path / "extra"))
  missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
  write_folder(tmp_path / "missing", cfg, missing)
  with pytest.raises(KeyError, match=r"h\.1\.mlp\.c_fc\.bias"):
    hf.load(str(tmp_path / "missing"))
