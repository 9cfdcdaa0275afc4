"""Loads StereoSet (dev.json, or the CSV layout) as arrays, candidates in a fixed label order.

The file (Nadeem et al. 2021, github.com/moinnadeem/StereoSet, data/dev.json)
is {"version": ..., "data": {"intrasentence": [...], "intersentence": [...]}};
each example has id, target, bias_type, context and three "sentences", each
with its own id, the sentence, five annotator "labels" and a "gold_label" of
stereotype, anti-stereotype or unrelated, in no fixed order. Here every
example's candidates are put in `LABELS` order (stereotype, anti-stereotype,
unrelated), which is the column order `baq.fairness.stereotype.stereoset_scores`
expects.

What a causal LM scores (`StereoSetTask.scoring_inputs`):
  intrasentence  the candidate sentence itself: in the real file it is already
                 the context with BLANK filled in ("The chess player was
                 BLANK." -> "The chess player was hispanic."), so no filling
                 is done here. The official generative evaluation
                 (code/eval_generative_models.py) scores it by its mean
                 per-token log-probability after a start token.
  intersentence  the candidate given the context, log p(sentence | context),
                 as the paper describes: score the candidate's tokens of
                 encode(prefix + " " + text) after the len(encode(prefix))
                 context tokens. As the official code does, "." is appended
                 to a context that does not end in . ! or ?. (That script's
                 own GPT-2 intersentence score, the candidate's unconditional
                 mean log-probability divided by the context's, does not
                 condition on the context; it is not reproduced.)
Mean per-token log-likelihoods are the scores to pass on: candidates differ in
length once a subword tokenizer splits them.

The CSV layout (`load_stereoset_csv`; `load_stereoset` takes a folder or a
.csv too): stereoset_intrasentence_dev.csv and stereoset_intersentence_dev.csv
with columns prompt, choices, bias_type, target, where `choices` is a numpy
array of three strings as numpy prints it (['a' 'b' 'c'], possibly over
several lines, each string a Python literal) ALWAYS in LABELS order.
Intrasentence candidates are the prompt with every BLANK filled by the
choice; intersentence ones are the choices, the prompt their context. The
rows carry no ids: an example's id is "<task>-<row>" (row from 1).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import re
from typing import Sequence, Union

import numpy as np

TASKS = ("intrasentence", "intersentence")
LABELS = ("stereotype", "anti-stereotype", "unrelated")
_KEYS = ("id", "target", "bias_type", "context", "sentences")
CSV_COLUMNS = ("prompt", "choices", "bias_type", "target")
CSV_FILES = {t: f"stereoset_{t}_dev.csv" for t in TASKS}  # names inside a CSV folder
_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)  # a Python string literal


@dataclasses.dataclass
class StereoSetTask:
  """One StereoSet task as parallel arrays (one row per example)."""
  name: str                 # "intrasentence" or "intersentence"
  id: np.ndarray            # str [n] example ids
  bias_type: np.ndarray     # str [n]
  target: np.ndarray        # str [n] the stereotyped term (per-target scores use it)
  context: np.ndarray       # str [n] (with BLANK for intrasentence)
  sentences: np.ndarray     # str [n, 3] candidates in LABELS order
  sentence_ids: np.ndarray  # str [n, 3]

  def __len__(self) -> int:
    return len(self.id)

  def scoring_inputs(self) -> tuple[np.ndarray, np.ndarray]:
    """(prefix [n, 3], text [n, 3]): the LM's score of a candidate is
    log p(text | prefix); the prefix is "" for intrasentence (the candidate
    is the whole sentence) and the context for intersentence."""
    if self.name == "intrasentence":
      return np.full(self.sentences.shape, "", dtype=object), self.sentences.astype(object)
    ctx = [c if c[-1:] in (".", "!", "?") else f"{c}." for c in self.context]
    prefix = np.repeat(np.array(ctx, dtype=object)[:, None], 3, axis=1)
    return prefix, self.sentences.astype(object)


@dataclasses.dataclass
class StereoSet:
  """The loaded tasks and the file's version."""
  version: str
  tasks: dict          # task name -> StereoSetTask
  bias_types: list     # sorted distinct bias types over the loaded tasks

  def __getitem__(self, name: str) -> StereoSetTask:
    return self.tasks[name]


def _ordered(example: dict, task: str, path: str) -> tuple[list, list]:
  """(sentences, sentence ids) of one example in LABELS order."""
  ex_id = example.get("id", "<no id>")
  try:
    gold = [s["gold_label"] for s in example["sentences"]]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: {task} example {ex_id} has a sentence without "
                     f"gold_label.") from e
  if sorted(gold) != sorted(LABELS):
    raise ValueError(f"{path}: {task} example {ex_id} has gold labels {gold}; expected "
                     f"exactly one each of {', '.join(LABELS)}.")
  by_label = {s["gold_label"]: s for s in example["sentences"]}
  return ([by_label[g]["sentence"] for g in LABELS],
          [str(by_label[g].get("id", "")) for g in LABELS])


def _task(examples: list, task: str, path: str) -> StereoSetTask:
  """Validates and stacks one task's examples."""
  cols = {k: [] for k in _KEYS[:4]}
  sents, sent_ids = [], []
  for pos, ex in enumerate(examples):
    missing = [k for k in _KEYS if k not in ex]
    if missing:
      raise ValueError(f"{path}: {task} example {ex.get('id', f'at position {pos}')} lacks "
                       f"{', '.join(missing)}.")
    if task == "intrasentence" and "BLANK" not in ex["context"]:
      raise ValueError(f"{path}: intrasentence example {ex['id']} has no BLANK in its "
                       f"context {ex['context']!r}.")
    s, i = _ordered(ex, task, path)
    sents.append(s)
    sent_ids.append(i)
    for k in cols:
      cols[k].append(str(ex[k]))
  shape = (len(examples), len(LABELS))
  return StereoSetTask(task, **{k: np.array(v, dtype=str) for k, v in cols.items()},
                       sentences=np.array(sents, dtype=str).reshape(shape),
                       sentence_ids=np.array(sent_ids, dtype=str).reshape(shape))


def _tasks(split) -> tuple:
  """The requested task names, checked against TASKS."""
  names = (split,) if isinstance(split, str) else tuple(split)
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise ValueError(f"Unknown StereoSet task(s) {', '.join(map(repr, unknown))}. "
                     f"Valid: {', '.join(TASKS)}.")
  return names


def _choices(text: str, where: str) -> list:
  """The strings of a printed numpy array of strings, in order."""
  found = list(_LITERAL.finditer(text))
  rest = _LITERAL.sub("", text).strip()
  if not (rest.startswith("[") and rest.endswith("]") and not rest[1:-1].strip()):
    raise ValueError(f"{where}: choices {text!r} is not a printed array of strings.")
  return [ast.literal_eval(m.group(0)) for m in found]


def _csv_task(path: str, task: str) -> StereoSetTask:
  """One task from its CSV file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"StereoSet file not found: {path}")
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (has "
                       f"{', '.join(reader.fieldnames or []) or 'none'}).")
    rows = list(reader)
  cols = {k: [] for k in ("id", "target", "bias_type", "context")}
  sents = []
  for row_no, row in enumerate(rows, 1):
    where = f"{path}: {task} row {row_no}"
    choices = _choices(row["choices"], where)
    if len(choices) != len(LABELS):
      raise ValueError(f"{where} has {len(choices)} choices; expected {len(LABELS)} "
                       f"({', '.join(LABELS)}).")
    prompt = row["prompt"]
    if task == "intrasentence":
      if "BLANK" not in prompt:
        raise ValueError(f"{where} has no BLANK in its prompt {prompt!r}.")
      choices = [prompt.replace("BLANK", c) for c in choices]
    sents.append(choices)
    for k, v in (("id", f"{task}-{row_no}"), ("target", row["target"]),
                 ("bias_type", row["bias_type"]), ("context", prompt)):
      cols[k].append(v)
  shape = (len(rows), len(LABELS))
  ids = np.array(cols["id"], dtype=str)
  return StereoSetTask(task, **{k: np.array(v, dtype=str) for k, v in cols.items()},
                       sentences=np.array(sents, dtype=str).reshape(shape),
                       sentence_ids=np.char.add(np.repeat(ids[:, None], 3, axis=1),
                                                np.array([f"-{g}" for g in LABELS])))


def load_stereoset_csv(path: str, *, split: Union[str, Sequence[str]] = TASKS) -> StereoSet:
  """Reads StereoSet from the CSV layout (module docstring).

  Args:
    path: a folder holding CSV_FILES, or one CSV file (then `split` names
      its single task).
    split: a task name or several, from TASKS.

  Returns:
    A `StereoSet` (version "csv") with one `StereoSetTask` per task.

  Raises:
    FileNotFoundError: a file is missing (the message names it).
    ValueError: an unknown task, several tasks for one file, a missing
      column (named), a row without three choices or (intrasentence)
      without BLANK (the row is named).
  """
  names = _tasks(split)
  if os.path.isdir(path):
    files = {n: os.path.join(path, CSV_FILES[n]) for n in names}
  elif len(names) == 1:
    files = {names[0]: path}
  else:
    raise ValueError(f"{path} is one CSV file: pass split= one of {', '.join(TASKS)}.")
  tasks = {n: _csv_task(p, n) for n, p in files.items()}
  bias = sorted({str(b) for t in tasks.values() for b in t.bias_type})
  return StereoSet(version="csv", tasks=tasks, bias_types=bias)


def load_stereoset(path: str, *, split: Union[str, Sequence[str]] = TASKS) -> StereoSet:
  """Reads StereoSet's dev.json (or a file of the same layout), or the CSV layout.

  Args:
    path: the JSON file; a folder or a .csv file goes to `load_stereoset_csv`.
    split: a task name or several, from TASKS.

  Returns:
    A `StereoSet` with one `StereoSetTask` per requested task.

  Raises:
    FileNotFoundError: the file is missing (the message names it).
    ValueError: an unknown task is requested (valid ones listed) or absent
      from the file; an example lacks a field, or (intrasentence) has no
      BLANK in its context, or does not have exactly one candidate of each
      gold label (each message names the example's id).
  """
  names = _tasks(split)
  if os.path.isdir(path) or path.endswith(".csv"):
    return load_stereoset_csv(path, split=names)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"StereoSet file not found: {path}")
  with open(path, encoding="utf-8") as f:
    obj = json.load(f)
  data = obj.get("data", {}) if isinstance(obj, dict) else {}
  absent = [n for n in names if n not in data]
  if absent:
    raise ValueError(f"{path} has no {', '.join(absent)} under 'data' "
                     f"(found: {', '.join(data) or 'nothing'}).")
  tasks = {n: _task(data[n], n, path) for n in names}
  bias = sorted({str(b) for t in tasks.values() for b in t.bias_type})
  return StereoSet(version=str(obj.get("version", "")), tasks=tasks, bias_types=bias)
