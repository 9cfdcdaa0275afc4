"""GGUF in and out: the real stories260K file, and tiny files written by gguf's own writer.

The reference files here are written by `gguf.GGUFWriter` the way llama.cpp's
convert_hf_to_gguf.py writes them: tensor names from the gguf package's
own table, q/k rows permuted for the "llama" architecture by a
transcription of that script's `LlamaModel.permute` (below, not baq's),
GPT-2's Conv1D weights transposed. The real file checks the rest: greedy
decoding from BOS must give karpathy's published sample word for word,
which only a right un-permutation and a right tokenizer give.
"""

import os

import flax.traverse_util as tu
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from baq.export.gguf_lm import write_gguf
from baq.models.lm import LM_FAMILIES, hf, scoring
from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.models.lm.gguf import gguf_to_hf, load_gguf
from conftest import SHARED_DATA

Q = gguf.GGMLQuantizationType
STORIES = os.path.join(SHARED_DATA, "lm", "stories260K.gguf")
TEXT = os.path.join(SHARED_DATA, "lm", "tinystories_valid_sample.txt")
SAMPLE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
          "park. One day, she saw a big, red ball. She wanted to play with it, but it was too "
          "high.")
needs_stories = pytest.mark.skipif(not os.path.isfile(STORIES), reason="no shared stories260K")

# Tiny tokenizers: a SentencePiece-style vocab ("llama") and a byte-level BPE ("gpt2").
SPM_PIECES = ["\u2581", "e", "h", "l", "o", "\u2581h", "ll", "\u2581he", "llo", "\u2581hello"]
SPM = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + SPM_PIECES
BPE_MERGES = ["\u0120 h", "\u0120h e", "l l", "ll o", "\u0120he llo"]
BPE = sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in BPE_MERGES] + [
    "<|endoftext|>"]
ARCHS = {  # GGUF architecture: (family, DecoderConfig fields)
    "llama": ("llama", dict(vocab_size=len(SPM), n_kv_heads=2, rope_theta=5e5,
                            tie_embeddings=False)),
    "qwen2": ("llama", dict(vocab_size=len(BPE), n_kv_heads=2, attn_bias=True,
                            tie_embeddings=True)),
    "gpt2": ("gpt2", dict(vocab_size=len(BPE), norm="layernorm", positions="learned",
                          mlp="gelu_tanh", attn_bias=True, out_bias=True, mlp_bias=True,
                          tie_embeddings=True)),
}


def llama_permute(weights, n_head, n_head_kv):
  """convert_hf_to_gguf.py's LlamaModel.permute, transcribed."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def random_model(arch, seed=0, **changes):
  family, fields = ARCHS[arch]
  cfg = DecoderConfig(**{**dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=64),
                         **fields, **changes})
  shapes = jax.eval_shape(lambda: CausalLM(cfg).init(jax.random.key(0),
                                                      jnp.zeros((1, 1), jnp.int32)))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  # Every leaf random, biases and norm scales too, so no layout error hides in zeros or ones.
  leaves = [(0.5 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves]
  return cfg, family, jax.tree.unflatten(tree, leaves)


def reference_gguf(path, arch, cfg, family, params, types=None):
  """Writes the model as convert_hf_to_gguf.py would; `types`: GGUF name -> Q or np dtype."""
  sd = LM_FAMILIES.get(family).from_params(params, cfg)
  names = gguf.get_tensor_name_map(
      {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.n_layers)
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.n_layers)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  if arch == "gpt2":
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(BPE)
    w.add_token_merges(BPE_MERGES)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL
                       for t in BPE])
  else:
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if arch == "llama":
      w.add_tokenizer_model("llama")
      w.add_token_list(SPM)
      w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))][::-1])
      w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
      w.add_bos_token_id(1)
      w.add_eos_token_id(2)
      w.add_unk_token_id(0)
    else:
      w.add_tokenizer_model("gpt2")
      w.add_tokenizer_pre("qwen2")
      w.add_token_list(BPE)
      w.add_token_merges(BPE_MERGES)
  for name, value in sd.items():
    value = np.asarray(value, np.float32)
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
      value = llama_permute(value, cfg.n_heads, cfg.n_heads)
    if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
      value = llama_permute(value, cfg.n_heads, cfg.n_kv_heads)
    if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
      value = value.T
    new = names.get_name(name, try_suffixes=(".weight", ".bias"))
    kind = (types or {}).get(new)
    if isinstance(kind, Q):
      w.add_tensor(new, gguf.quants.quantize(value, kind), raw_dtype=kind)
    else:
      w.add_tensor(new, np.ascontiguousarray(value, kind or np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def assert_same_params(a, b):
  a, b = tu.flatten_dict(dict(a), sep="/"), tu.flatten_dict(dict(b), sep="/")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def file_tensors(path):
  return {t.name: (Q(t.tensor_type), np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def stories():
  if not os.path.isfile(STORIES):
    pytest.skip("no shared stories260K")
  return load_gguf(STORIES)


@needs_stories
def test_stories_greedy_decoding_gives_the_published_sample(stories):
  model, variables, tok, family = stories
  assert family == "llama" and model.config.n_kv_heads == 4 and model.config.tie_embeddings
  want = tok.encode(SAMPLE).ids  # BOS first
  out = np.asarray(scoring.generate(model, variables, [[1]], len(want) - 1))[0]
  assert tok.decode(out.tolist()) == SAMPLE
  # The model learnt llama.cpp's (SentencePiece's) tokenization: greedy decoding
  # emits exactly the ids the tokenizer gives the sample.
  assert out.tolist() == want


@needs_stories
def test_stories_tokenizer_round_trips_text(stories):
  tok = stories[2]
  with open(TEXT) as f:
    text = f.read()
  paragraph = text[:2000]
  ids = tok.encode(paragraph).ids
  assert ids[0] == 1 and tok.decode(ids) == paragraph
  assert tok.decode(tok.encode(text).ids) == text
  # Outside the vocabulary: UTF-8 byte tokens, decoded back.
  odd = "caf\u00e9 \u2713 \u65e5\u672c"
  assert tok.decode(tok.encode(odd).ids) == odd


@needs_stories
def test_stories_as_a_hugging_face_folder_gives_the_same_logits(stories, tmp_path):
  model, variables, tok, _ = stories
  m2, v2, tok2, family = hf.load(gguf_to_hf(STORIES, str(tmp_path)))
  assert family == "llama" and m2.config == model.config
  x = jnp.asarray([tok.encode(SAMPLE).ids])
  logits = jax.jit(model.apply)  # one program for both
  np.testing.assert_array_equal(logits(variables, x), logits(v2, x))
  assert tok2.encode(SAMPLE).ids == tok.encode(SAMPLE).ids


@needs_stories
def test_stories_written_by_baq_reads_back(stories, tmp_path):
  model, variables, tok, family = stories
  path = write_gguf(str(tmp_path / "s.gguf"), model.config, variables["params"], family, tok)
  m2, v2, tok2, _ = load_gguf(path)
  assert m2.config == model.config
  assert_same_params(v2["params"], variables["params"])
  with open(TEXT) as f:
    text = f.read()
  assert tok2.encode(text).ids == tok.encode(text).ids
  # The original file's layout: every tensor it has (the tied head aside) byte for byte.
  ours, theirs = file_tensors(path), file_tensors(STORIES)
  assert set(theirs) - set(ours) == {"output.weight"}
  for name, (kind, data) in ours.items():
    assert kind == theirs[name][0] and np.array_equal(data, theirs[name][1]), name
  path16 = write_gguf(str(tmp_path / "s16.gguf"), model.config, variables["params"], family, tok,
                      dtype="f16")
  half = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32)
                      if x.ndim == 2 else np.asarray(x), variables["params"])
  assert_same_params(load_gguf(path16)[1]["params"], half)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_reference_file_reads_back_and_baq_writes_it_alike(arch, tmp_path):
  cfg, family, params = random_model(arch)
  path = reference_gguf(str(tmp_path / "ref.gguf"), arch, cfg, family, params)
  model, variables, tok, fam = load_gguf(path)
  assert fam == family and model.config == cfg
  assert_same_params(variables["params"], params)
  x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  logits = jax.jit(CausalLM(cfg).apply)  # one program for both
  np.testing.assert_array_equal(logits(variables, x), logits({"params": params}, x))
  text = "hello hello, h\u00e9llo"
  ids = tok.encode(text, add_special_tokens=False).ids
  assert tok.decode(ids) == text
  ours = write_gguf(str(tmp_path / "ours.gguf"), cfg, params, family, tok, arch=arch)
  ref, mine = file_tensors(path), file_tensors(ours)
  assert sorted(ref) == sorted(mine)
  for name in ref:
    assert ref[name][0] == mine[name][0] and np.array_equal(ref[name][1], mine[name][1]), name
  m2, v2, tok2, _ = load_gguf(ours)
  assert m2.config == cfg and tok2.encode(text, add_special_tokens=False).ids == ids
  assert_same_params(v2["params"], params)


def test_llama_tokenizer_merges_by_score(tmp_path):
  cfg, family, params = random_model("llama")
  tok = load_gguf(reference_gguf(str(tmp_path / "r.gguf"), "llama", cfg, family, params))[2]
  assert tok.encode("hello hello").tokens == ["<s>", "\u2581hello", "\u2581hello"]
  assert tok.encode("hole").tokens == ["<s>", "\u2581h", "o", "l", "e"]
  assert tok.encode("\u00e9").tokens == ["<s>", "\u2581", "<0xC3>", "<0xA9>"]


def test_half_and_quantized_tensors_are_dequantized(tmp_path):
  cfg, family, params = random_model("llama")
  types = {"blk.0.ffn_up.weight": Q.Q8_0, "blk.1.attn_v.weight": Q.Q4_K if cfg.d_model % 256 == 0
           else Q.Q4_0, "blk.0.attn_output.weight": Q.BF16, "blk.1.ffn_gate.weight": np.float16}
  path = reference_gguf(str(tmp_path / "q.gguf"), "llama", cfg, family, params, types)
  got = load_gguf(path)[1]["params"]
  raw = file_tensors(path)
  for name, (block, layer) in {"blk.0.ffn_up.weight": ("block_0", "mlp/up_proj"),
                               "blk.1.attn_v.weight": ("block_1", "attn/v_proj"),
                               "blk.0.attn_output.weight": ("block_0", "attn/o_proj"),
                               "blk.1.ffn_gate.weight": ("block_1", "mlp/gate_proj")}.items():
    kind, data = raw[name]
    want = gguf.quants.dequantize(data, kind).T
    kernel = np.asarray(tu.flatten_dict(got, sep="/")[f"{block}/{layer}/kernel"])
    np.testing.assert_array_equal(kernel, want, err_msg=name)
    exact = np.asarray(tu.flatten_dict(params, sep="/")[f"{block}/{layer}/kernel"])
    assert np.abs(kernel - exact).max() < 0.2 * np.abs(exact).max()


def test_overrides_write_raw_blocks(tmp_path):
  cfg, family, params = random_model("llama")
  tok = load_gguf(reference_gguf(str(tmp_path / "r.gguf"), "llama", cfg, family, params))[2]
  w = np.asarray(params["block_0"]["mlp"]["up_proj"]["kernel"]).T  # GGUF [out, in]
  blocks = gguf.quants.quantize(w, Q.Q8_0)
  path = write_gguf(str(tmp_path / "o.gguf"), cfg, params, family, tok,
                    overrides={"blk.0.ffn_up.weight": (blocks, Q.Q8_0)})
  kind, data = file_tensors(path)["blk.0.ffn_up.weight"]
  assert kind == Q.Q8_0 and np.array_equal(data, blocks)
  got = load_gguf(path)[1]["params"]["block_0"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(got, gguf.quants.dequantize(blocks, Q.Q8_0).T)


def test_unsupported_architecture_lists_the_supported(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "falcon")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(KeyError, match=r"'falcon'.*gpt2, llama, qwen2"):
    load_gguf(str(tmp_path / "f.gguf"))


def test_unreadable_tensor_type_is_named(tmp_path):
  cfg, family, params = random_model("llama")
  path = reference_gguf(str(tmp_path / "i.gguf"), "llama", cfg, family, params,
                        {"blk.1.attn_norm.weight": np.int32})
  with pytest.raises(ValueError, match=r"'blk\.1\.attn_norm\.weight' has type I32"):
    load_gguf(path)


def test_impossible_exports_write_nothing(tmp_path):
  cfg, family, params = random_model("llama")
  out = tmp_path / "out"
  out.mkdir()
  path = str(out / "m.gguf")
  down = np.zeros((cfg.d_model, cfg.d_ff // 32 * 34 + 34), np.uint8)  # d_ff=48: no 32-blocks
  with pytest.raises(ValueError, match=r"Q8_0 cannot hold tensor 'blk\.0\.ffn_down\.weight'"):
    write_gguf(path, cfg, params, family, overrides={"blk.0.ffn_down.weight": (down, Q.Q8_0)})
  big = jax.tree.map(lambda x: x, params)
  big["block_1"]["mlp"]["up_proj"]["kernel"] = np.full((cfg.d_model, cfg.d_ff), 1e6, np.float32)
  with pytest.raises(ValueError, match=r"'f16' cannot hold tensor 'blk\.1\.ffn_up\.weight'"):
    write_gguf(path, cfg, big, family, dtype="f16")
  with pytest.raises(ValueError, match="dtype must be one of f32, f16"):
    write_gguf(path, cfg, params, family, dtype="q4")
  with pytest.raises(ValueError, match=r"'gpt2' cannot hold DecoderConfig\.norm"):
    write_gguf(path, cfg, params, "gpt2", arch="gpt2")
  windowed = DecoderConfig(**{**cfg.__dict__, "sliding_window": 8})
  with pytest.raises(ValueError, match="sliding_window"):
    write_gguf(path, windowed, params, family)
  assert os.listdir(out) == []


@needs_stories
def test_stories_config_loads_through_the_gguf_source(stories):
  from baq.study.lm import study  # pylint: disable=import-outside-toplevel
  from configs import lm as lm_config  # pylint: disable=import-outside-toplevel
  c = lm_config.get_config("stories")
  assert os.path.samefile(c.model.gguf_file, STORIES) and os.path.isfile(c.data.crows_pairs)
  built = study.build_model(c, {}, "", 0)
  assert built["family"] == "llama" and built["model"].config == stories[0].config
  assert built["hf_config"]["model_type"] == "llama" and built["hf_config"]["bos_token_id"] == 1
  assert built["tokenizer"].encode(SAMPLE).ids == stories[2].encode(SAMPLE).ids
  c.model.source = "onnx"
  with pytest.raises(KeyError, match="gguf, hf, train"):
    study.check(c)
