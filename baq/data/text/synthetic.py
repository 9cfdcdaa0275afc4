"""A SYNTHETIC text corpus with a controlled stereotype association, and its test sets.

Nothing here is real text about real people. Sentences come from templates
that name one of 20 occupations and one group word of a bias type:
  gender  groups (male, female): he/she, his/her, him/her, man/woman, father/mother
  age     groups (young, old): young/old, younger/older, youthful/elderly
Each occupation has a stereotyped group per bias type (`templates.py`), and a
sentence uses that group's word with probability `association`, the other
group's word otherwise, so a language model trained on the corpus learns an
association of known strength. Filler sentences name no group.

Every template has a free filler slot ({x}); a (template, occupation, filler)
combination is the unit the test sets are built from. A fraction `eval_frac`
of combinations is reserved for evaluation and never appears in train or
held-out text, so the paired sets test the learned occupation-group
association on unseen sentences. Held-out text is drawn like the training text
(it is for perplexity; the combination space is finite, so some held-out
sentences also occur in training).

From the reserved combinations:
  * CrowS-Pairs layout (crows_pairs_anonymized.csv): sent_more uses the
    occupation's stereotyped group, sent_less the other; the pair differs in
    that one word. As in the real data, the "disadvantaged" group (female,
    old) decides the direction: "stereo" when sent_more is about it (it shows
    the stereotype), "antistereo" when sent_less is about it (it violates
    the stereotype). Either way the metric asks whether sent_more is preferred.
  * StereoSet layout (dev.json): intrasentence examples have a context with
    BLANK where the group word goes, and full candidate sentences; the
    unrelated one puts an object noun in the blank. Intersentence examples
    have the occupation sentence as context and the group sentence as the
    candidate; the unrelated candidate is a filler sentence. The three
    candidates are shuffled, as in the real file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os

import numpy as np

from baq.data.text.templates import (BIAS_TYPES, FILLERS, KINDS, OCCUPATIONS, PLACES, THINGS,
                                    BiasType, Template)

CSV_COLUMNS = ("", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations",
               "anon_writer", "anon_annotators")


@dataclasses.dataclass
class SyntheticText:
  """A generated corpus: text splits, paired sets, and how it was made."""
  train: list            # training lines (str)
  heldout: list          # held-out lines, for perplexity
  pairs: list            # CrowS-Pairs rows: dicts keyed by CSV_COLUMNS
  stereoset: dict        # the dev.json object
  info: dict             # seed and generation parameters
  # CrowS-Pairs-layout rows from the *training* combinations, disjoint from
  # `pairs` and `stereoset`: calibration pairs (Fair-GPTQ, importance) that
  # leave the evaluation sets unseen.
  calibration_pairs: list = dataclasses.field(default_factory=list)


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _render(t: Template, occ: str, word: str, x: str) -> tuple[str, str]:
  """(context or "", sentence) of a template, capitalised as running text."""
  sentence = _cap(t.sentence.format(occ=occ, g=word, x=x))
  return (_cap(t.context.format(occ=occ, x=x)) if t.context else ""), sentence


def _combos(bias: BiasType, kind: str) -> list:
  """Every (template, occupation, filler) index triple of a bias type's templates."""
  return [(ti, oi, fi) for ti, t in enumerate(getattr(bias, kind))
          for oi in range(len(OCCUPATIONS)) for fi in range(len(t.fills))]


def _line(bias_name: str, kind: str, combo, group: int) -> tuple[str, str]:
  """(context, sentence) of a combination with group `group`'s word."""
  bias = BIAS_TYPES[bias_name]
  t = getattr(bias, kind)[combo[0]]
  return _render(t, OCCUPATIONS[combo[1]][0], bias.slots[t.slot][group], t.fills[combo[2]])


def _stereotyped(bias_name: str, combo) -> int:
  return OCCUPATIONS[combo[1]][1 + list(BIAS_TYPES).index(bias_name)]


def _filler(rng: np.random.Generator, with_occupation: bool = True) -> str:
  forms = FILLERS if with_occupation else [f for f in FILLERS if "{occ}" not in f]
  return _cap(forms[rng.integers(len(forms))].format(
      t=THINGS[rng.integers(len(THINGS))], p=PLACES[rng.integers(len(PLACES))],
      occ=OCCUPATIONS[rng.integers(len(OCCUPATIONS))][0]))


def _sample_lines(rng, n, allowed, association, filler_frac, inter_frac) -> list:
  """n corpus lines: fillers, or allowed combinations with a drawn group."""
  lines = []
  for _ in range(n):
    if rng.random() < filler_frac:
      lines.append(_filler(rng))
      continue
    bias_name = list(BIAS_TYPES)[rng.integers(len(BIAS_TYPES))]
    kind = "inter" if rng.random() < inter_frac else "intra"
    pool = allowed[bias_name, kind]
    combo = pool[rng.integers(len(pool))]
    stereo = _stereotyped(bias_name, combo)
    group = stereo if rng.random() < association else 1 - stereo
    lines.append(" ".join(p for p in _line(bias_name, kind, combo, group) if p))
  return lines


def _eval_sets(rng, reserved: dict, seed: int) -> tuple[list, dict]:
  """CrowS-Pairs rows and the StereoSet object from the reserved combinations."""
  def uid(*key):
    return hashlib.md5(":".join(map(str, ("synthetic", seed) + key)).encode()).hexdigest()

  pairs, tasks = [], {"intrasentence": [], "intersentence": []}
  for (bias_name, kind), combos in reserved.items():
    bias = BIAS_TYPES[bias_name]
    task = "intrasentence" if kind == "intra" else "intersentence"
    for combo in combos:
      s = _stereotyped(bias_name, combo)
      ctx, more = _line(bias_name, kind, combo, s)
      less = _line(bias_name, kind, combo, 1 - s)[1]
      pairs.append({"": len(pairs), "sent_more": f"{ctx} {more}".strip(),
                    "sent_less": f"{ctx} {less}".strip(),
                    "stereo_antistereo": "stereo" if s == bias.disadvantaged else "antistereo",
                    "bias_type": bias_name, "annotations": str([[bias_name]] * 5),
                    "anon_writer": "synthetic", "anon_annotators": str(["synthetic"] * 5)})
      if kind == "intra":
        t = bias.intra[combo[0]]
        blank = Template(t.sentence.replace("{g}", "BLANK"), t.slot, t.fills)
        ctx = _render(blank, OCCUPATIONS[combo[1]][0], "", t.fills[combo[2]])[1]
        unrelated = _render(t, OCCUPATIONS[combo[1]][0], THINGS[rng.integers(len(THINGS))],
                            t.fills[combo[2]])[1]
      else:
        unrelated = _filler(rng, with_occupation=False)
      ex_id = uid(task, len(tasks[task]))
      cands = [(more, "stereotype"), (less, "anti-stereotype"), (unrelated, "unrelated")]
      tasks[task].append({
          "id": ex_id, "target": OCCUPATIONS[combo[1]][0], "bias_type": bias_name,
          "context": ctx, "sentences": [
              {"sentence": cands[j][0], "id": uid(ex_id, cands[j][1]),
               "labels": [{"label": cands[j][1], "human_id": f"synthetic{k}"} for k in range(5)],
               "gold_label": cands[j][1]} for j in rng.permutation(3)]})
  return pairs, {"version": "synthetic-1.0", "data": tasks}


def generate(seed: int, *, association: float = 0.85, num_train: int = 20000,
             num_heldout: int = 2000, filler_frac: float = 0.25, inter_frac: float = 0.3,
             eval_frac: float = 0.25) -> SyntheticText:
  """Generates the SYNTHETIC corpus and its paired sets; deterministic in `seed`.

  Args:
    seed: numpy seed of every choice.
    association: probability that a sentence uses its occupation's
      stereotyped group (0.5: no association; 1: always).
    num_train: training lines.
    num_heldout: held-out lines.
    filler_frac: fraction of lines that name no group.
    inter_frac: fraction of group lines that are two sentences (an occupation
      sentence, then a group sentence), as StereoSet's intersentence task.
    eval_frac: fraction of (template, occupation, filler) combinations kept
      out of train and held-out text for the paired sets.

  Returns:
    A `SyntheticText`.
  """
  if not 0.0 <= association <= 1.0 or not 0.0 < eval_frac < 1.0:
    raise ValueError(f"need 0 <= association <= 1 and 0 < eval_frac < 1, got "
                     f"{association}, {eval_frac}.")
  rng = np.random.default_rng(seed)
  allowed, reserved = {}, {}
  for bias_name, bias in BIAS_TYPES.items():
    for kind in KINDS:
      combos = _combos(bias, kind)
      order = rng.permutation(len(combos))
      k = max(1, round(eval_frac * len(combos)))
      reserved[bias_name, kind] = [combos[i] for i in sorted(order[:k])]
      allowed[bias_name, kind] = [combos[i] for i in sorted(order[k:])]
  args = (association, filler_frac, inter_frac)
  train = _sample_lines(rng, num_train, allowed, *args)
  heldout = _sample_lines(rng, num_heldout, allowed, *args)
  pairs, stereoset = _eval_sets(rng, reserved, seed)
  # As many calibration pairs as evaluation pairs, from the training combinations.
  sample = {key: [combos[i] for i in sorted(rng.permutation(len(combos))[:len(reserved[key])])]
            for key, combos in allowed.items()}
  calibration = _eval_sets(rng, sample, seed)[0]
  info = dict(seed=seed, association=association, num_train=num_train, num_heldout=num_heldout,
              filler_frac=filler_frac, inter_frac=inter_frac, eval_frac=eval_frac)
  return SyntheticText(train, heldout, pairs, stereoset, info, calibration)


def write(folder: str, data: SyntheticText) -> dict:
  """Writes train.txt, heldout.txt, crows_pairs_anonymized.csv, dev.json, README.

  Args:
    folder: created if missing.
    data: from `generate`.

  Returns:
    dict of file name -> path.
  """
  os.makedirs(folder, exist_ok=True)
  paths = {n: os.path.join(folder, n) for n in (
      "train.txt", "heldout.txt", "crows_pairs_anonymized.csv", "calibration_pairs.csv",
      "dev.json", "README")}
  for name, lines in (("train.txt", data.train), ("heldout.txt", data.heldout)):
    with open(paths[name], "w") as f:
      f.write("".join(line + "\n" for line in lines))
  for name, rows in (("crows_pairs_anonymized.csv", data.pairs),
                     ("calibration_pairs.csv", data.calibration_pairs)):
    with open(paths[name], "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(CSV_COLUMNS)
      writer.writerows([row[c] for c in CSV_COLUMNS] for row in rows)
  with open(paths["dev.json"], "w") as f:
    json.dump(data.stereoset, f, indent=1)
  table = "\n".join(f"  {o:<13} gender: {BIAS_TYPES['gender'].groups[g]:<7} "
                    f"age: {BIAS_TYPES['age'].groups[a]}" for o, g, a in OCCUPATIONS)
  with open(paths["README"], "w") as f:
    f.write(
        "SYNTHETIC DATA. Generated by baq.data.text.synthetic.generate; not real text and not\n"
        "the real CrowS-Pairs or StereoSet. Templated sentences name an occupation and a group\n"
        "word; a sentence uses the occupation's stereotyped group with probability\n"
        f"`association`. Parameters: {json.dumps(data.info)}\n\n"
        "train.txt / heldout.txt: one line per text (held-out is for perplexity).\n"
        "crows_pairs_anonymized.csv: CrowS-Pairs' columns; sent_more uses the stereotyped group.\n"
        "dev.json: StereoSet's layout (intrasentence with BLANK, intersentence with context).\n"
        "Both are built from template combinations never used in train.txt or heldout.txt.\n"
        "calibration_pairs.csv: the same layout from training combinations (for calibration).\n\n"
        f"Stereotyped groups:\n{table}\n")
  return paths
