"""The CLIP study on pretrained checkpoints and real data kinds, end to end on tiny files.

A random Hugging Face CLIP folder (config.json, model.safetensors from
`convert.hf_from_params`, a WordLevel tokenizer.json whose post-processor adds
<|startoftext|> / <|endoftext|>, as CLIP's does) and tiny FairFace, FACET and
labelled image folders written with PIL (random-noise images) are run through
`baq.study.vlm.study.run_seed` with source "hf" and fp32, rtn4 and llm_int8; the
FairFace retrieval skew is checked against an independent computation.
"""

import csv
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from baq.data.vlm import facet, fairface
from baq.fairness import vlm_metrics
from baq.models.clip import CLIP, TextConfig, convert
from baq.models.clip.model import dummy_inputs
from baq.study.vlm import study, data as vlm_data, quant as vlm_quant
from configs import vlm as vlm_config

WORDS = "a photo of person doctor criminal guitarist nurse cat dog".split()
VOCAB = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
SOT, EOT = len(VOCAB), len(VOCAB) + 1  # CLIP's end-of-text is its largest id
CTX = 12
HF_CONFIG = dict(
    model_type="clip", projection_dim=16,
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, image_size=32, patch_size=8),
    text_config=dict(vocab_size=EOT + 1, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=CTX, eos_token_id=2))  # legacy 2: argmax pooling
QUERIES = ("a photo of a person", "a photo of a doctor", "a photo of a criminal")
PIXELS = np.random.default_rng(0)  # the datasets' noise images


def clip_tokenizer(post_processor=True):
  tk = Tokenizer(models.WordLevel({**VOCAB, vlm_quant.SOT: SOT, vlm_quant.EOT: EOT},
                                  unk_token="<unk>"))
  tk.normalizer = normalizers.Lowercase()
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.add_special_tokens([vlm_quant.SOT, vlm_quant.EOT])
  if post_processor:
    tk.post_processor = processors.TemplateProcessing(
        single=f"{vlm_quant.SOT} $A {vlm_quant.EOT}",
        special_tokens=[(vlm_quant.SOT, SOT), (vlm_quant.EOT, EOT)])
  return tk


def contiguous(state):
  # The converters return transposed views, which safetensors.numpy.save_file
  # (0.8) writes in memory order, silently: copy them first.
  return {k: np.array(v, order="C") for k, v in state.items()}  # 0-d stays 0-d


def _noise(path, size=(40, 40)):
  Image.fromarray(PIXELS.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _csv(path, header, rows):
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip")
  cfg = convert.config_from_hf(HF_CONFIG)
  params = CLIP(cfg).init(jax.random.key(0), *dummy_inputs(cfg))["params"]
  # Weights of CLIP's scale (not init's 0.02), so that images and texts embed apart.
  rng = np.random.default_rng(1)
  sd = {k: v if v.ndim == 0 or k.endswith("norm.weight") or "layer_norm" in k or "layrnorm" in k
        else rng.normal(0, 0.3, v.shape).astype(np.float32)
        for k, v in convert.hf_from_params(params, cfg).items()}
  save_file(contiguous(sd), str(path / "model.safetensors"))
  with open(path / "config.json", "w") as f:
    json.dump(HF_CONFIG, f)
  clip_tokenizer().save(str(path / "tokenizer.json"))
  return str(path)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  ff = tmp_path_factory.mktemp("fairface")
  os.makedirs(ff / "val")
  rows = []
  for i in range(21):
    _noise(ff / "val" / f"{i}.png")
    rows.append((f"val/{i}.png", fairface.GROUPS["age"][i % 9], ("Male", "Female")[i % 2],
                 fairface.GROUPS["race"][i % 7], "True"))
  _csv(ff / "fairface_label_val.csv", fairface.COLUMNS, rows)
  fc = tmp_path_factory.mktemp("facet")
  os.makedirs(fc / "imgs_1")
  header = ["person_id", "filename", "class1", "bounding_box"] + list(facet.REQUIRED_COLUMNS[4:])
  rows = []
  for i in range(18):  # gender masc / fem / na; skin lighter / middle / darker (one na)
    _noise(fc / "imgs_1" / f"sa_{i}.png", (60, 50))
    box = json.dumps(dict(x=5.0 + i, y=4.0, width=30.0, height=40.0))
    gender = [int((0, 1, 3)[i % 3] == g) for g in range(4)]
    tones = [int(t == (2, 5, 8)[i % 3]) * (i != 4) for t in range(1, 11)]
    age = [int(i % 4 == a) for a in range(4)]
    rows.append([str(i), f"sa_{i}.png", ("guitarist", "doctor", "nurse")[i % 3], box,
                 *gender, *tones, int(i == 4), *age])
  _csv(fc / "annotations.csv", header, rows)
  return dict(fairface=str(ff), facet=str(fc),
              image_folder=image_folder(tmp_path_factory.mktemp("folder"), ("a", "b")))


def image_folder(path, groups):
  os.makedirs(path / "images")
  for i in range(16):
    _noise(path / "images" / f"{i}.png")
  _csv(path / "labels.csv", ("image", "label", "group"),
       [(f"{i}.png", ("cat", "dog")[i % 2], groups[(i // 2) % len(groups)]) for i in range(16)])
  return str(path)


def config(kind, root, hf_folder):
  c = vlm_config.get_config("tiny")
  c.model.source, c.model.hf_folder = "hf", hf_folder
  c.data.kind, c.data.root, c.data.queries = kind, root, QUERIES
  c.quantizers, c.retrieval_k, c.quant.calib_images = "fp32,rtn4,llm_int8", "5", 2
  return c


@pytest.fixture(scope="module")
def finished(hf_folder, roots, tmp_path_factory):
  out = {}
  for kind, root in roots.items():
    c = config(kind, root, hf_folder)
    if kind == "fairface":
      c.data.max_images = 15
    workdir = str(tmp_path_factory.mktemp(kind))
    out[kind] = (c, workdir, study.run_seed(c, workdir, 0))
  return out


EXPECTED = {  # attribute -> group names, and whether the kind is zero-shot
    "fairface": ({"gender": ["Male", "Female"], "race": list(fairface.GROUPS["race"]),
                  "age": list(fairface.GROUPS["age"])}, False),
    "facet": ({"gender": ["masc", "fem", "non_binary"], "skin_tone": ["lighter", "middle",
                                                                       "darker"],
               "age": ["young", "middle", "older"]}, True),
    "image_folder": ({"group": ["a", "b"]}, True)}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_cells_per_attribute(finished, kind):
  c, _, runs = finished[kind]
  groups, zero_shot = EXPECTED[kind]
  assert list(runs) == ["fp32", "rtn4", "llm_int8"]
  images = {"fairface": 15, "facet": 16, "image_folder": 14}[kind]  # max_images; calib held out
  for name, r in runs.items():
    assert r["data"]["groups"] == groups and r["data"]["images"] == images
    assert set(r["zero_shot"]) == (set(groups) if zero_shot else set())
    assert set(r["retrieval"]) == (set() if zero_shot else set(groups))
    for a, zs in r["zero_shot"].items():
      assert len(zs["group_accuracy"]) == len(groups[a])
    if kind == "facet":  # "na" persons (a third by gender, one by skin) are left out
      gender = r["zero_shot"]["gender"]["group_count"]
      assert 10 <= sum(gender) <= 12 and gender[2] == 0
      assert sum(r["zero_shot"]["skin_tone"]["group_count"]) in (15, 16)
    if name == "fp32":
      assert "cells" not in r
      continue
    want = ({f"{a}/{g}" for a, names in groups.items() for g in names} if zero_shot
            else {f"max_skew@5/{a}" for a in groups})
    assert set(r["cells"]) == want
    assert {cell["verdict"] for cell in r["cells"].values()} <= set(vlm_metrics.VERDICTS)
  rtn = runs["rtn4"]
  changes = [cell["change"] for cell in rtn["cells"].values() if cell["change"] is not None]
  assert np.nanmax(np.abs(changes)) > 0  # 4-bit weights move some group's metric
  if zero_shot:
    fp = runs["fp32"]["zero_shot"]
    for a, names in groups.items():
      for g, n in enumerate(names):
        want = rtn["zero_shot"][a]["group_accuracy"][g]
        if want is not None:
          assert np.isclose(rtn["cells"][f"{a}/{n}"]["change"],
                            100 * (want - fp[a]["group_accuracy"][g]))
  table = study.format_table({0: runs}, "5")
  assert all(f"  {a}: " in table for a in groups)


def test_fairface_skew_matches_an_independent_computation(finished, hf_folder):
  c, _, runs = finished["fairface"]
  model, variables, _ = convert.load(hf_folder)
  data = vlm_data.load(c, 32)
  assert len(data) == 15 and data.labels is None
  mean, std = np.array(vlm_quant.CLIP_STATS, np.float32)
  x = (data.images.astype(np.float32) / 255 - mean) / std
  tokens = np.zeros((len(QUERIES), CTX), np.int32)
  for i, q in enumerate(QUERIES):
    ids = [SOT] + [VOCAB[w] for w in q.split()] + [EOT]
    tokens[i, :len(ids)] = ids
  img = np.asarray(model.apply(variables, x, method="encode_image"))
  txt = np.asarray(model.apply(variables, tokens, method="encode_text"))
  sim = vlm_metrics.cosine_similarity(txt, img)
  for a, (ids, names) in data.attributes.items():
    want = vlm_metrics.retrieval_skew(sim, ids, 5, num_groups=len(names))
    got = runs["fp32"]["retrieval"][a]["5"]
    np.testing.assert_allclose(got["max_skew"], want["max_skew"], atol=1e-6)
    np.testing.assert_allclose(got["ndkl"], want["ndkl"], atol=1e-6)


def test_results_are_reused_and_other_settings_refused(finished, monkeypatch):
  c, workdir, runs = finished["facet"]
  def fail(*_):
    raise AssertionError("the model was prepared again")
  monkeypatch.setattr(vlm_data, "prepare", fail)
  again = study.run_seed(c, workdir, 0)
  assert json.dumps(again, sort_keys=True) == json.dumps(runs, sort_keys=True)
  c = c.copy_and_resolve_references()
  c.data.max_images = 5
  with pytest.raises(ValueError, match="other settings.*data.max_images"):
    study.run_seed(c, workdir, 0)


def test_open_clip_source_gives_the_same_model(finished, hf_folder, tmp_path):
  c, _, runs = finished["image_folder"]
  cfg = convert.config_from_hf(HF_CONFIG)
  params = convert.hf_to_params(convert.read_safetensors(f"{hf_folder}/model.safetensors"), cfg)
  weights = str(tmp_path / "oc.safetensors")
  save_file(contiguous(convert.open_clip_from_params(params, cfg)), weights)
  with open(tmp_path / "oc.json", "w") as f:
    json.dump(dict(embed_dim=16, quick_gelu=True, vision_cfg=dict(
        image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2.0),
                   text_cfg=dict(context_length=CTX, vocab_size=EOT + 1, width=32, heads=2,
                                 layers=1, mlp_ratio=2.0)), f)
  c = c.copy_and_resolve_references()
  c.model.source, c.quantizers = "open_clip", "fp32"
  c.model.open_clip_weights = weights
  c.model.open_clip_config = str(tmp_path / "oc.json")
  with pytest.raises(FileNotFoundError, match="set model.tokenizer"):
    study.run_seed(c, str(tmp_path / "no_tokenizer"), 0)
  c.model.tokenizer = f"{hf_folder}/tokenizer.json"
  got = study.run_seed(c, str(tmp_path / "oc"), 0)["fp32"]["zero_shot"]["group"]
  assert got["group_accuracy"] == runs["fp32"]["zero_shot"]["group"]["group_accuracy"]
  assert got["class_recall"] == runs["fp32"]["zero_shot"]["group"]["class_recall"]


def test_tokens_follow_the_checkpoints_rule():
  text = TextConfig(vocab_size=EOT + 1, context_length=6, width=8, layers=1, heads=1, mlp_dim=8)
  for tk in (clip_tokenizer(), clip_tokenizer(post_processor=False)):  # markers added if absent
    ids = vlm_quant.encode_texts(tk, ["A photo of a dog", "a photo of a person a doctor"], text)
    assert ids.tolist() == [[SOT, 1, 2, 3, 1, EOT], [SOT, 1, 2, 3, 1, EOT]]  # cut, EOS kept
    assert vlm_quant.encode_texts(tk, ["a cat"], text).tolist() == [[SOT, 1, 9, EOT, 0, 0]]
  other = TextConfig(vocab_size=EOT + 1, context_length=6, width=8, layers=1, heads=1,
                     mlp_dim=8, pool="eos", eos_token_id=3)
  with pytest.raises(ValueError, match="does not fit the checkpoint"):
    vlm_quant.encode_texts(clip_tokenizer(), ["a cat"], other)
  images = np.random.default_rng(3).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  mean, std = np.array(vlm_quant.CLIP_STATS)
  np.testing.assert_allclose(vlm_quant.normalize(images, vlm_quant.CLIP_STATS),
                             (images / 255 - mean) / std, atol=1e-5)


def test_bad_input_is_refused(hf_folder, roots, tmp_path):
  c = config("fairface", roots["fairface"], str(tmp_path / "no_such_clip"))
  with pytest.raises(FileNotFoundError, match="no_such_clip"):
    study.run_seed(c, str(tmp_path / "a"), 0)
  c = config("imagenet", roots["fairface"], hf_folder)
  with pytest.raises(KeyError, match="facet, fairface, image_folder, synthetic"):
    study.run_seed(c, str(tmp_path / "b"), 0)
  c = config("image_folder", image_folder(tmp_path / "one", ("a",)), hf_folder)
  with pytest.raises(ValueError, match="attribute 'group' has 1 group"):
    study.run_seed(c, str(tmp_path / "c"), 0)
  c = config("fairface", roots["fairface"], hf_folder)
  c.data.attributes = "gender,religion"
  with pytest.raises(ValueError, match="no attribute 'religion'. Valid: age, gender, race"):
    study.run_seed(c, str(tmp_path / "d"), 0)
  c = config("fairface", roots["fairface"], hf_folder)
  c.quantizers = "fp32,mixed4"
  with pytest.raises(ValueError, match="mixed4 needs zero-shot labels"):
    study.run_seed(c, str(tmp_path / "e"), 0)
  c.model.source = "train"
  with pytest.raises(ValueError, match="no captions to train"):
    study.run_seed(c, str(tmp_path / "f"), 0)
