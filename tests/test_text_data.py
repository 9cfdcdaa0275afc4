"""baq.data.text: tokenizer round trips, the SYNTHETIC corpus's measured
association and paired sets, and the CrowS-Pairs / StereoSet loaders' errors."""

import csv
import json
import os
import string

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from baq.data.text import crows_pairs, stereoset, synthetic, templates, tokenizer

# Every group word -> (bias type, group id); "her" is female as poss and obj.
GROUP_WORDS = {w: (b, g) for b, bias in templates.BIAS_TYPES.items()
               for pair in bias.slots.values() for g, w in enumerate(pair)}
OCC = {o: (gen, age) for o, gen, age in templates.OCCUPATIONS}
REAL_HEADER = ["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations",
               "anon_writer", "anon_annotators"]


def words(text):
  return [w.strip(string.punctuation).lower() for w in text.split()]


@pytest.fixture(scope="module")
def data():
  return synthetic.generate(0)


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("synthetic_text"))
  synthetic.write(path, data)
  return path


def test_tokenizer_round_trip_unknown_words_padding_and_save(data, tmp_path):
  tok = tokenizer.word_tokenizer(data.train)
  assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3]
  assert tokenizer.special_ids(tok) == dict(bos=2, eos=3, pad=0, unk=1)
  s = "The Nurse said that she would be late."
  enc = tok.encode(s, add_special_tokens=False)
  assert enc.tokens == ["the", "nurse", "said", "that", "she", "would", "be", "late", "."]
  assert tok.decode(enc.ids) == "the nurse said that she would be late ."
  assert tok.encode("the zebra", add_special_tokens=False).ids[1] == 1  # <unk>
  # Every evaluation sentence is in the training vocabulary.
  evals = [p["sent_more"] for p in data.pairs] + [p["sent_less"] for p in data.pairs]
  assert all(1 not in e.ids for e in tok.encode_batch(evals, add_special_tokens=False))

  ids, lengths = tokenizer.encode_batch(tok, ["the nurse", s, "zebra"], bos_id=2, eos_id=3)
  assert ids.dtype == np.int32 and lengths.dtype == np.int32
  assert ids.shape == (3, 11) and lengths.tolist() == [4, 11, 3]
  assert ids[0, :4].tolist() == [2, tok.token_to_id("the"), tok.token_to_id("nurse"), 3]
  assert ids[2, :3].tolist() == [2, 1, 3] and (ids[0, 4:] == 0).all() and (ids[2, 3:] == 0).all()
  cut, cut_len = tokenizer.encode_batch(tok, [s, "the"], bos_id=2, max_len=5, pad_id=7)
  assert cut.shape == (2, 5) and cut_len.tolist() == [5, 2] and cut[1, 2:].tolist() == [7] * 3
  assert cut[0].tolist() == [2] + enc.ids[:4]

  saved = tokenizer.save_tokenizer(tok, str(tmp_path / "tok"))
  for path in (saved, str(tmp_path / "tok")):
    assert tokenizer.load_tokenizer(path).encode(s).ids == tok.encode(s).ids
  missing = str(tmp_path / "nowhere" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json"):
    tokenizer.load_tokenizer(missing)


def test_min_count_and_gpt2_style_special_ids():
  tok = tokenizer.word_tokenizer(["a a b", "a c c"], min_count=2)
  assert tok.get_vocab_size() == 6  # 4 specials, a, c
  assert tok.encode("b a c", add_special_tokens=False).ids == [1, 4, 5]  # a: 3 uses, c: 2
  gpt = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2},
                                   unk_token="<|endoftext|>"))
  gpt.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  ids = tokenizer.special_ids(gpt)
  assert ids == dict(bos=0, eos=0, pad=None, unk=None)
  out, n = tokenizer.encode_batch(gpt, ["hello world", "world"], bos_id=ids["bos"], pad_id=0)
  assert out.tolist() == [[0, 1, 2], [0, 2, 0]] and n.tolist() == [3, 2]


def test_generation_is_deterministic_per_seed(data):
  again = synthetic.generate(0)
  assert again.train == data.train and again.heldout == data.heldout
  assert again.pairs == data.pairs and again.stereoset == data.stereoset
  assert synthetic.generate(1).train != data.train


@pytest.mark.parametrize("association", [0.85, 0.6])
def test_measured_association_matches_the_parameter(association):
  d = synthetic.generate(3, association=association, num_train=20000)
  hits, fillers = {b: [] for b in templates.BIAS_TYPES}, 0
  for line in d.train:
    ws = words(line)
    groups = [GROUP_WORDS[w] for w in ws if w in GROUP_WORDS]
    if not groups:
      fillers += 1
      continue
    (bias, group), = groups  # exactly one group word per line
    occ, = [w for w in ws if w in OCC]
    hits[bias].append(group == OCC[occ][list(templates.BIAS_TYPES).index(bias)])
  assert fillers / len(d.train) == pytest.approx(0.25, abs=0.015)
  for bias, h in hits.items():
    assert len(h) > 6000
    assert np.mean(h) == pytest.approx(association, abs=0.02), bias


def test_pairs_differ_in_the_group_word_only_with_real_direction_semantics(data):
  train, seen = set(data.train) | set(data.heldout), set()
  for row in data.pairs:
    more, less = words(row["sent_more"]), words(row["sent_less"])
    diff = [i for i, (a, b) in enumerate(zip(more, less)) if a != b]
    assert len(more) == len(less) and len(diff) == 1
    (bias, g_more), (bias_less, g_less) = GROUP_WORDS[more[diff[0]]], GROUP_WORDS[less[diff[0]]]
    assert bias == bias_less == row["bias_type"] and g_more == 1 - g_less
    occ, = [w for w in more if w in OCC]
    assert g_more == OCC[occ][list(templates.BIAS_TYPES).index(bias)]  # sent_more: stereotyped
    # "stereo": sent_more is about the disadvantaged group; "antistereo": sent_less is.
    disadvantaged = templates.BIAS_TYPES[bias].disadvantaged
    assert row["stereo_antistereo"] == ("stereo" if g_more == disadvantaged else "antistereo")
    assert row["sent_more"] not in train and row["sent_less"] not in train  # held out
    seen.add((bias, row["stereo_antistereo"]))
  assert seen == {(b, d) for b in templates.BIAS_TYPES for d in ("stereo", "antistereo")}
  assert len(data.pairs) == 450


def test_written_csv_loads_with_the_real_layout(data, folder):
  path = os.path.join(folder, "crows_pairs_anonymized.csv")
  with open(path, newline="") as f:
    assert next(csv.reader(f)) == REAL_HEADER
  cp = crows_pairs.load_crows_pairs(path)
  assert len(cp) == len(data.pairs) and cp.bias_types == ["age", "gender"]
  assert cp.sent_more.tolist() == [p["sent_more"] for p in data.pairs]
  assert cp.direction.tolist() == [p["stereo_antistereo"] for p in data.pairs]
  assert cp.index.tolist() == [str(i) for i in range(len(data.pairs))]
  gender = crows_pairs.load_crows_pairs(path, bias_types=["gender"])
  assert set(gender.bias_type) == {"gender"} and len(gender) == np.sum(cp.bias_type == "gender")
  with open(os.path.join(folder, "README")) as f:
    assert f.read().startswith("SYNTHETIC DATA.")


def test_written_dev_json_loads_in_label_order(data, folder):
  ss = stereoset.load_stereoset(os.path.join(folder, "dev.json"))
  assert ss.bias_types == ["age", "gender"]
  for name, task in ss.tasks.items():
    raw = data.stereoset["data"][name]
    assert len(task) == len(raw) > 0
    for i, ex in enumerate(raw):
      by_label = {s["gold_label"]: s["sentence"] for s in ex["sentences"]}
      assert task.sentences[i].tolist() == [by_label[g] for g in stereoset.LABELS]
      assert task.target[i] == ex["target"] and task.bias_type[i] == ex["bias_type"]
    prefix, text = task.scoring_inputs()
    assert prefix.shape == text.shape == (len(task), 3)
    if name == "intrasentence":
      assert (prefix == "").all()
      # As the official loader: the word at BLANK's position fills the context.
      for ctx, cands in zip(task.context, task.sentences):
        k = ctx.split(" ").index(next(w for w in ctx.split(" ") if "BLANK" in w))
        for c in cands:
          fill = c.split(" ")[k].strip(string.punctuation)
          assert ctx.replace("BLANK", fill) == c
    else:
      assert (prefix == task.context[:, None]).all() and all(c.endswith(".") for c in task.context)
      train = set(data.train)
      assert not any(f"{p} {t}" in train for p, t in zip(prefix[:, 0], text[:, 0]))


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def test_crows_pairs_loader_errors_and_quoted_commas(tmp_path):
  missing = str(tmp_path / "absent.csv")
  with pytest.raises(FileNotFoundError, match="absent.csv"):
    crows_pairs.load_crows_pairs(missing)
  _write_csv(tmp_path / "cols.csv", ["", "sent_more", "stereo_antistereo"], [[0, "a", "stereo"]])
  with pytest.raises(ValueError, match="sent_less, bias_type"):
    crows_pairs.load_crows_pairs(str(tmp_path / "cols.csv"))
  rows = [[0, "He ran, fast.", "She ran, fast.", "stereo", "gender", "", "", ""],
          [7, "x y", "x z", "neutral", "age", "", "", ""]]
  _write_csv(tmp_path / "dir.csv", REAL_HEADER, rows)
  with pytest.raises(ValueError, match=r"line 3 \(index 7\).*'neutral'"):
    crows_pairs.load_crows_pairs(str(tmp_path / "dir.csv"))
  rows[1][3] = "antistereo"
  _write_csv(tmp_path / "ok.csv", REAL_HEADER, rows)
  cp = crows_pairs.load_crows_pairs(str(tmp_path / "ok.csv"))
  assert cp.sent_more.tolist() == ["He ran, fast.", "x y"] and cp.bias_types == ["age", "gender"]
  with pytest.raises(ValueError, match="Valid: age, gender"):
    crows_pairs.load_crows_pairs(str(tmp_path / "ok.csv"), bias_types=["race-color"])


def test_stereoset_loader_errors(data, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    stereoset.load_stereoset(str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="Valid: intrasentence, intersentence"):
    stereoset.load_stereoset(str(tmp_path / "nope.json"), split="inter")
  obj = json.loads(json.dumps(data.stereoset))
  bad = obj["data"]["intersentence"][3]
  bad["sentences"][0]["gold_label"] = next(
      g for g in stereoset.LABELS if g != bad["sentences"][0]["gold_label"])
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(obj))
  with pytest.raises(ValueError, match=f"intersentence example {bad['id']} has gold labels"):
    stereoset.load_stereoset(str(path))
  only_intra = stereoset.load_stereoset(str(path), split="intrasentence")
  assert list(only_intra.tasks) == ["intrasentence"]
  blank = obj["data"]["intrasentence"][0]
  blank["context"] = blank["context"].replace("BLANK", "someone")
  path.write_text(json.dumps(obj))
  with pytest.raises(ValueError, match=f"example {blank['id']} has no BLANK"):
    stereoset.load_stereoset(str(path), split="intrasentence")
  path.write_text(json.dumps({"version": "1", "data": {"intrasentence": []}}))
  with pytest.raises(ValueError, match="no intersentence"):
    stereoset.load_stereoset(str(path))
