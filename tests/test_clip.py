"""baq's Flax CLIP against an independent numpy reading of HF and OpenCLIP checkpoints.

Small random checkpoints in both layouts are written to disk (an HF folder
with config.json, model.safetensors and tokenizer.json; an OpenCLIP
safetensors file with its model-config JSON) and read with `convert.load` /
`convert.load_open_clip`; image and text embeddings and logits must match
`clip_reference` (torch semantics in float64 numpy) under both EOS rules.
Full-size ViT-B/32 names and shapes are checked in both layouts with random
float32 values (151M parameters, about 0.6 GB per layout), as are the round
trips, injected quantization and the error messages.
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

from baq.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, convert, logits
from baq.quant.inject import QuantMode, Quantizer, QuantSpec

import clip_reference as ref  # tests/ is on sys.path under pytest

V, EOS, ALT_EOS = 61, 60, 7  # EOS is the largest id, as CLIP's 49407
HF_SMALL = dict(
    model_type="clip", projection_dim=16, logit_scale_init_value=2.6592,
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8,
                       hidden_act="quick_gelu"),
    text_config=dict(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=12, hidden_act="quick_gelu",
                     eos_token_id=2))  # OpenAI's legacy id: HF pools at the argmax
OC_SMALL = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2,
                                              head_width=8, mlp_ratio=1.5),
                text_cfg=dict(context_length=12, vocab_size=V, width=24, heads=4, layers=2,
                              mlp_ratio=2.0))  # quick_gelu absent: erf GELU
RNG = np.random.default_rng(1)
PIXELS = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)  # NCHW, as torch reads them
IMAGES = jnp.asarray(PIXELS.transpose(0, 2, 3, 1))


def _tokens():
  """Rows of BOS-like, body, EOS (then 0 or EOS padding); ALT_EOS sits before EOS."""
  ids = RNG.integers(ALT_EOS + 1, EOS - 1, (3, 12)).astype(np.int32)
  for row, (end, alt) in enumerate(((5, 2), (11, 8), (7, 3))):
    ids[row, end], ids[row, alt] = EOS, ALT_EOS
    ids[row, end + 1:] = EOS if row == 2 else 0  # HF pads with EOS: the first one counts
  return ids


TOKENS = _tokens()


def random_state_dict(shapes, seed=0, scale=0.3):
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    norm = len(shape) == 1 and key.endswith("weight")  # LayerNorm weights around 1
    out[key] = (norm + scale * rng.standard_normal(shape)).astype(np.float32)
  out["logit_scale"] = np.asarray(2.0 + rng.random(), np.float32)
  return out


def write_hf(path, cfg, sd):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  save_file(sd, os.path.join(path, "model.safetensors"))
  return str(path)


def write_open_clip(path, cfg, sd):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump(cfg, f)
  save_file(sd, os.path.join(path, "open_clip_model.safetensors"))
  return os.path.join(path, "open_clip_model.safetensors"), os.path.join(path, "model.json")


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
  sd = random_state_dict(ref.hf_shapes(HF_SMALL))
  return write_hf(tmp_path_factory.mktemp("hf"), HF_SMALL, sd), sd


@pytest.fixture(scope="module")
def oc_ckpt(tmp_path_factory):
  sd = random_state_dict(ref.open_clip_shapes(OC_SMALL), seed=1)
  return write_open_clip(tmp_path_factory.mktemp("oc"), OC_SMALL, sd), sd


def _outputs(model, variables):
  feats = [np.asarray(model.apply(variables, x, method=m))
           for x, m in ((IMAGES, "encode_image"), (jnp.asarray(TOKENS), "encode_text"))]
  image, text, scale = model.apply(variables, IMAGES, jnp.asarray(TOKENS))
  return feats, (np.asarray(image), np.asarray(text), np.asarray(logits(image, text, scale)))


def _assert_parity(model, variables, want_feats, logit_scale):
  feats, embeds = _outputs(model, variables)
  assert np.abs(want_feats[0]).max() > 1.0 and np.abs(want_feats[1]).max() > 1.0
  for got, want in zip(feats, want_feats):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  for got, want in zip(embeds, ref.normalized_logits(*want_feats, logit_scale)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("eos", [2, ALT_EOS])
def test_hf_matches_reference(hf_ckpt, tmp_path, eos):
  path, sd = hf_ckpt
  cfg = dict(HF_SMALL, text_config=dict(HF_SMALL["text_config"], eos_token_id=eos))
  if eos != 2:
    path = write_hf(tmp_path, cfg, sd)
  model, variables, tokenizer = convert.load(path)
  assert tokenizer.encode("w3 w7").ids == [3, 7]
  assert model.config.text.pool == ("argmax" if eos == 2 else "eos")
  want = ref.hf_features(sd, cfg, PIXELS, TOKENS)
  _assert_parity(model, variables, want, sd["logit_scale"])


@pytest.mark.parametrize("pool", ["argmax", "eos"])
def test_open_clip_matches_reference(oc_ckpt, pool):
  (weights, config_path), sd = oc_ckpt
  cfg = OC_SMALL if pool == "argmax" else dict(
      OC_SMALL, text_cfg=dict(OC_SMALL["text_cfg"], pool_type="eos", eos_id=ALT_EOS))
  model, variables = convert.load_open_clip(weights, config_path if pool == "argmax" else cfg)
  assert model.config.activation == "gelu" and model.config.vision.heads == 4
  want = ref.open_clip_features(sd, cfg, PIXELS, TOKENS)
  _assert_parity(model, variables, want, sd["logit_scale"])


def test_eos_rules_differ_and_masks_matter(hf_ckpt):
  """The two EOS rules and the causal mask change the reference (so parity means something)."""
  _, sd = hf_ckpt
  argmax = ref.hf_features(sd, HF_SMALL, PIXELS, TOKENS)[1]
  alt = dict(HF_SMALL, text_config=dict(HF_SMALL["text_config"], eos_token_id=ALT_EOS))
  assert np.linalg.norm(argmax - ref.hf_features(sd, alt, PIXELS, TOKENS)[1], axis=-1).min() > 0.1
  # Row 0's EOS feature does not see its padding: other padding gives the same feature.
  padded = TOKENS.copy()
  padded[0, 6:] = 9
  np.testing.assert_allclose(ref.hf_features(sd, HF_SMALL, PIXELS, padded)[1][0], argmax[0])


def test_round_trips_and_cross_layout(hf_ckpt, oc_ckpt):
  for (sd, to, back, table) in (
      (hf_ckpt[1], convert.hf_to_params, convert.hf_from_params, convert.hf_table),
      (oc_ckpt[1], convert.open_clip_to_params, convert.open_clip_from_params,
       convert.open_clip_table)):
    cfg = (convert.config_from_hf(HF_SMALL) if to is convert.hf_to_params
           else convert.config_from_open_clip(OC_SMALL))
    params = to(sd, cfg)
    convert.check_params(CLIP(cfg), params, table(cfg))
    again = back(params, cfg)
    assert sorted(again) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(again[k], sd[k], err_msg=k)
  # HF -> baq -> OpenCLIP: the same model in the other layout gives the same embeddings.
  cfg = convert.config_from_hf(HF_SMALL)
  oc_sd = convert.open_clip_from_params(convert.hf_to_params(hf_ckpt[1], cfg), cfg)
  oc_cfg = dict(OC_SMALL, quick_gelu=True)  # the same heads, and HF_SMALL's activation
  want = ref.hf_features(hf_ckpt[1], HF_SMALL, PIXELS, TOKENS)
  got = ref.open_clip_features(oc_sd, oc_cfg, PIXELS, TOKENS)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-9)
  with_ids = convert.hf_from_params(convert.hf_to_params(hf_ckpt[1], cfg), cfg, position_ids=True)
  assert with_ids["text_model.embeddings.position_ids"].tolist() == [list(range(12))]
  assert sorted(convert.hf_to_params(with_ids, cfg)) == ["logit_scale", "text",
                                                        "text_projection", "vision",
                                                        "visual_projection"]


VIT_B32_HF = dict(model_type="clip", projection_dim=512,
                  vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, image_size=224, patch_size=32),
                  text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                                   num_hidden_layers=12, num_attention_heads=8,
                                   max_position_embeddings=77, eos_token_id=2))
VIT_B32_OC = dict(embed_dim=512, quick_gelu=True,  # OpenCLIP's ViT-B-32-quickgelu.json
                  vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8,
                                layers=12))


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_full_size_vit_b32(layout):
  # Random float32 values (151M, 0.6 GB): the converters take views, so
  # the check against eval_shape and the export need little more.
  if layout == "hf":
    cfg, shapes = convert.config_from_hf(VIT_B32_HF), ref.hf_shapes(VIT_B32_HF)
    to, back, table = convert.hf_to_params, convert.hf_from_params, convert.hf_table
    sd = random_state_dict(shapes)
    sd["vision_model.embeddings.position_ids"] = np.arange(50)[None]  # older files' buffers
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]
  else:
    cfg, shapes = convert.config_from_open_clip(VIT_B32_OC), ref.open_clip_shapes(VIT_B32_OC)
    to, back, table = (convert.open_clip_to_params, convert.open_clip_from_params,
                       convert.open_clip_table)
    sd = random_state_dict(shapes)
  assert cfg == CLIPConfig(logit_scale_init=cfg.logit_scale_init)  # the defaults are ViT-B/32
  params = to(sd, cfg)
  convert.check_params(CLIP(cfg), params, table(cfg))
  assert sum(np.size(v) for v in tu.flatten_dict(params).values()) == 151_277_313
  again = back(params, cfg)
  assert {k: v.shape for k, v in again.items()} == shapes
  assert all(np.array_equal(again[k], sd[k]) for k in again)


def _quantizer(bits):
  spec = QuantSpec(init_bits=bits, granularity="channel", parametrization="fixed")
  return Quantizer(rules=((r"(vision|text)/block_\d+/.*", spec),), mode=QuantMode.EVAL)


def test_quantization_is_injected(hf_ckpt):
  path, _ = hf_ckpt
  model, variables, _ = convert.load(path)
  flat_float = tu.flatten_dict(variables["params"], sep="/")
  _, (image, text, _) = _outputs(model, variables)
  q_model, q_vars, _ = convert.load(path, quant=_quantizer(8))
  flat = tu.flatten_dict(q_vars["params"], sep="/")
  bits = {k.rsplit("/", 2)[0]: v for k, v in flat.items() if k.endswith("/bits")}
  layers = [f"{t}/block_{i}/{m}" for t in ("vision", "text") for i in range(2)
            for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/fc1",
                      "mlp/fc2")]
  assert sorted(bits) == sorted(layers)  # not the patch conv, embeddings or projections
  for layer in layers:
    assert bits[layer].shape == (flat[f"{layer}/kernel"].shape[-1],)
    np.testing.assert_array_equal(bits[layer], 8.0)
  assert all(np.array_equal(flat[k], v) for k, v in flat_float.items())  # float leaves untouched
  errors = []
  for m, v in ((q_model, q_vars), convert.load(path, quant=_quantizer(2))[:2]):
    _, (qi, qt, _) = _outputs(m, v)
    errors.append(max(np.linalg.norm(qi - image, axis=-1).max(),
                      np.linalg.norm(qt - text, axis=-1).max()))  # unit vectors: ~ angle
  err8, err2 = errors
  assert 0 < err8 < 0.05 and err2 > 0.3 and err2 > 10 * err8, errors


def test_missing_files_are_named(hf_ckpt, oc_ckpt, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.load(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(HF_SMALL, f)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    convert.load(str(tmp_path))
  (weights, config_path), _ = oc_ckpt
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    convert.load_open_clip(str(tmp_path / "nope.safetensors"), config_path)
  with pytest.raises(FileNotFoundError, match="ViT-X.json"):
    convert.load_open_clip(weights, str(tmp_path / "ViT-X.json"))
  open(tmp_path / "model.bin", "w").close()
  with pytest.raises(ValueError, match="safetensors"):
    convert.load_open_clip(str(tmp_path / "model.bin"), config_path)


def test_checkpoint_mismatches_are_named(hf_ckpt, oc_ckpt, tmp_path):
  _, sd = hf_ckpt
  bad = dict(sd, **{"visual_projection.weight": np.zeros((15, 32), np.float32)})
  with pytest.raises(ValueError, match=r"visual_projection.weight: checkpoint \(15, 32\) vs "
                                       r"model \(16, 32\)"):
    convert.load(write_hf(tmp_path / "shape", HF_SMALL, bad))
  with pytest.raises(ValueError, match=r"vision_model\.extra\.weight"):
    convert.load(write_hf(tmp_path / "extra", HF_SMALL, dict(sd, **{
        "vision_model.extra.weight": sd["logit_scale"]})))
  with pytest.raises(KeyError, match=r"text_model\.final_layer_norm\.bias"):
    convert.load(write_hf(tmp_path / "missing", HF_SMALL, {
        k: v for k, v in sd.items() if k != "text_model.final_layer_norm.bias"}))
  (_, config_path), oc_sd = oc_ckpt
  cfg = convert.config_from_open_clip(OC_SMALL)
  with pytest.raises(ValueError, match="other layout.*load_open_clip"):
    convert.hf_to_params(oc_sd, cfg)
  with pytest.raises(ValueError, match="other layout"):
    convert.open_clip_to_params(sd, cfg)
  weights, _ = write_open_clip(tmp_path / "oc", OC_SMALL, dict(oc_sd, **{
      "visual.transformer.resblocks.1.attn.in_proj_weight": np.zeros((95, 32), np.float32)}))
  with pytest.raises(ValueError, match=r"resblocks\.1\.attn\.in_proj_weight .*\(95, 32\)"):
    convert.load_open_clip(weights, config_path)
  with pytest.raises(ValueError, match=r"\['visual\.extra'\]"):
    convert.open_clip_to_params(dict(oc_sd, **{"module.visual.extra": oc_sd["logit_scale"]}), cfg)


@pytest.mark.parametrize("make,field", [
    (lambda: VisionConfig(width=30, heads=4), "vision.width"),
    (lambda: VisionConfig(image_size=30, patch_size=8), "vision.image_size"),
    (lambda: VisionConfig(layers=0), "vision.layers"),
    (lambda: TextConfig(pool="mean"), "text.pool"),
    (lambda: TextConfig(pool="eos"), "text.eos_token_id"),
    (lambda: TextConfig(pool="eos", eos_token_id=49408), "text.eos_token_id"),
    (lambda: CLIPConfig(activation="relu"), "activation"),
    (lambda: CLIPConfig(norm_eps=0.0), "norm_eps"),
    (lambda: CLIPConfig(embed_dim=0), "embed_dim")])
def test_bad_config_names_the_field(make, field):
  with pytest.raises(ValueError, match=f"CLIPConfig.{field} must be"):
    make()


@pytest.mark.parametrize("section,field,value", [
    ("vision_config", "hidden_act", "gelu_new"), ("text_config", "hidden_act", "gelu"),
    ("vision_config", "num_channels", 1), ("text_config", "layer_norm_eps", 1e-6),
    ("", "model_type", "siglip")])
def test_unsupported_hf_configs_are_refused(section, field, value):
  cfg = (dict(HF_SMALL, **{field: value}) if not section
         else dict(HF_SMALL, **{section: dict(HF_SMALL[section], **{field: value})}))
  with pytest.raises(ValueError, match=f"{section}.?{field}="):
    convert.config_from_hf(cfg)


@pytest.mark.parametrize("section,field,value", [
    ("vision_cfg", "layers", [3, 4, 6, 3]), ("vision_cfg", "timm_model_name", "vit_base"),
    ("vision_cfg", "attentional_pool", True), ("vision_cfg", "no_ln_pre", True),
    ("vision_cfg", "pool_type", "avg"), ("vision_cfg", "ls_init_value", 1e-5),
    ("vision_cfg", "image_size", [32, 48]), ("text_cfg", "embed_cls", True),
    ("text_cfg", "no_causal_mask", True), ("text_cfg", "proj_bias", True),
    ("text_cfg", "hf_model_name", "roberta-base"), ("text_cfg", "pool_type", "last"),
    ("text_cfg", "text_arch", "modern"), ("text_cfg", "norm_kwargs", {"eps": 1e-6}),
    ("", "custom_text", True), ("", "init_logit_bias", -10), ("", "multimodal_cfg", {})])
def test_unsupported_open_clip_options_are_refused(section, field, value):
  cfg = (dict(OC_SMALL, **{field: value}) if not section
         else dict(OC_SMALL, **{section: dict(OC_SMALL[section], **{field: value})}))
  with pytest.raises(ValueError, match=f"{section}.?{field}"):
    convert.config_from_open_clip(cfg)


def test_jit_and_bad_inputs(hf_ckpt):
  model, variables, _ = convert.load(hf_ckpt[0])
  eager = model.apply(variables, IMAGES, jnp.asarray(TOKENS))
  jitted = jax.jit(model.apply)(variables, IMAGES, jnp.asarray(TOKENS))
  for e, j in zip(eager, jitted):
    np.testing.assert_allclose(j, e, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="image_size=32"):
    model.apply(variables, jnp.zeros((1, 24, 24, 3)), method="encode_image")
  with pytest.raises(ValueError, match="context_length=12"):
    model.apply(variables, jnp.zeros((1, 13), jnp.int32), method="encode_text")
