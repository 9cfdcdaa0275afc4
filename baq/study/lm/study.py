r"""The language-model bias study: `python -m baq.study.lm --config=configs/lm.py --workdir=W`.

Per seed (`config.seeds`), in WORKDIR/seed<S>:
  fp32/           the trained model's checkpoints (source "train"; resumed)
  results/<setting>.json   each setting's metrics (a finished setting is reused)
  report.json     every setting of the seed
and WORKDIR/summary.json, the mean +- std over seeds, printed as a table:
the CrowS-Pairs stereotype score, its change from full precision with the
number of seeds whose exact McNemar test rejects at 0.05, the StereoSet SS,
LMS and ICAT (intrasentence), and held-out perplexity.

With the synthetic data (the default) the corpus is written once to
WORKDIR/data; the seed varies the model's initialisation, its batches and the
calibration sample, not the corpus.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from baq import launch, progress
from baq.experiment import checks
from baq.data.text import tokenizer as tok
from baq.models.lm import LM_FAMILIES, gguf, hf
from baq.models.lm.decoder import CausalLM
from baq.registry import Registry
from baq.study.lm import evaluate as lm_eval, exports, quant as lm_quant, texts as texts_
from baq.train import fit
from baq import workdir as wd

FLOAT = "fp32"
EXPORTS = exports.EXPORTS  # config.export's formats (`baq.study.lm.exports`)


load_texts = texts_.load_texts  # the study's text (`baq.study.lm.texts`)
calibration = texts_.calibration


def gpt2_config(config, vocab: int, special: Optional[dict] = None) -> dict:
  """The config.json of the trained model: a GPT-2 of the config's size (so it exports).

  `special`: the tokenizer's bos/eos ids (`tokenizer.special_ids`), which
  runtimes read from config.json.
  """
  m = config.model
  special = special or {}
  ids = {f"{k}_token_id": special[k] for k in ("bos", "eos") if special.get(k) is not None}
  return {**ids, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
          "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff,
          "n_positions": config.data.max_len, "layer_norm_epsilon": 1e-5,
          "activation_function": "gelu_new", "tie_word_embeddings": True}


# config.model.source -> build(config, texts, seed_dir, seed) -> dict(model, params,
# tokenizer, family, hf_config): where the float model comes from.
MODEL_SOURCES: Registry[Callable[..., dict]] = Registry("LM study model source")


@MODEL_SOURCES.register("hf")
def _hf_source(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """A Hugging Face checkpoint folder, `model.hf_folder`."""
  model, variables, tokenizer, family = hf.load(config.model.hf_folder)
  if tokenizer is None:
    raise FileNotFoundError(f"{config.model.hf_folder} has no tokenizer.json.")
  return dict(model=model, params=variables["params"], tokenizer=tokenizer, family=family,
              hf_config=hf.read_folder(config.model.hf_folder)[0])


@MODEL_SOURCES.register("gguf")
def _gguf_source(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """A GGUF file, `model.gguf_file`, with the tokenizer of its metadata."""
  contents = gguf.read(config.model.gguf_file)
  if contents.tokenizer is None:
    raise ValueError(f"{config.model.gguf_file} has no tokenizer metadata.")
  model, variables, tokenizer, family = gguf.build(contents)
  return dict(model=model, params=variables["params"], tokenizer=tokenizer, family=family,
              hf_config=gguf.hf_config(contents))


@MODEL_SOURCES.register("train")
def _train_source(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """A GPT-2 of the config's size, trained on the text (resumed from its checkpoints)."""
  tokenizer = tok.word_tokenizer(texts["train"])
  ids = tok.special_ids(tokenizer)
  x, lengths = tok.encode_batch(tokenizer, texts["train"], bos_id=ids["bos"], eos_id=ids["eos"],
                                pad_id=ids["pad"], max_len=config.data.max_len)
  hf_config = gpt2_config(config, tokenizer.get_vocab_size(), ids)
  model = CausalLM(LM_FAMILIES.get("gpt2").config_from_hf(hf_config))
  t = config.train
  cfg = fit.FitConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                      warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                      seed=seed, save_every=t.save_every)
  params, _ = fit.train_lm(model, x, lengths, cfg, os.path.join(seed_dir, FLOAT))
  return dict(model=model, params=params, tokenizer=tokenizer, family="gpt2",
              hf_config=hf_config)


def build_model(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """The float model from `config.model.source` (`MODEL_SOURCES`).

  Returns:
    dict(model, params, tokenizer, family, hf_config).
  """
  return MODEL_SOURCES.get(config.model.source)(config, texts, seed_dir, seed)


def _headline(row: dict) -> str:
  ood = f" (out of domain {row['ppl_ood']:.3f})" if "ppl_ood" in row else ""
  return (f"CrowS {row['crows']:.2f}, perplexity {row['ppl']:.3f}{ood}, "
          f"{row['avg_bits']:.2f} bits")


def _row(summary: dict, info: dict) -> dict:
  """The figures a table shows, from one setting's summary."""
  intra = summary["stereoset"].get("intrasentence", {}).get("overall", {})
  inter = summary["stereoset"].get("intersentence", {}).get("overall", {})
  row = dict(crows=summary["crows"]["overall"]["metric_score"],
             ppl=summary["perplexity"]["perplexity"], ss=intra.get("ss", np.nan),
             lms=intra.get("lms", np.nan), icat=intra.get("icat", np.nan),
             avg_bits=info.get("avg_bits", 32.0), gap=summary["gap"]["mean"])
  if inter:
    row.update(ss_inter=inter.get("ss", np.nan), icat_inter=inter.get("icat", np.nan))
  for text, p in summary.get("perplexities", {}).items():
    if text != "heldout":
      row[f"ppl_{text.removeprefix('heldout_')}"] = p["perplexity"]
  for b in summary["crows"]["per_bias_type"]:
    row[f"crows_{b}"] = summary["crows"]["per_bias_type"][b]["metric_score"]
  if "change" in summary:
    row.update(change=summary["change"]["overall"]["change"],
               p=summary["change"]["overall"]["p_value"],
               # McNemar's discordant pairs: b left the stereotype, c took it up
               flips_away=summary["change"]["overall"]["b"],
               flips_to=summary["change"]["overall"]["c"],
               gap_change=summary["gap_change"]["change"],
               gap_p=summary["gap_change"]["p_wilcoxon"])
  return row


def _setup(config, root: str, seed: int, seed_dir: str, shared: dict, p) -> dict:
  """Text, model, encoded benchmarks and the float model's scores (shared across seeds
  when the model does not depend on the seed)."""
  if "setup" in shared:
    return shared["setup"]
  texts = load_texts(config, root)
  p.note("text read")
  built = build_model(config, texts, seed_dir, seed)
  p.note(f"model ready ({config.model.source})")
  enc = lm_eval.encode(texts["crows"], texts["stereoset"], texts["heldout"], built["tokenizer"],
                       max_len=config.data.max_len, text_unit=texts_.text_unit(config),
                       heldout_tokens=int(config.data.get("heldout_tokens", 0) or 0))
  out = dict(texts=texts, built=built, enc=enc,
             fp_scores=lm_eval.score(built["model"], {"params": built["params"]}, enc))
  if config.model.source != "train":  # a fixed pre-trained model: the same for every seed
    shared["setup"] = out
  return out


def run_seed(config, root: str, seed: int, shared: Optional[dict] = None) -> dict:
  """Every setting of one seed (finished ones reused); setting -> table row.

  `shared` (one dict for every seed of a run) keeps what does not depend on
  the seed: for a pre-trained model, its text, encodings and scores, and
  the scores of the runtimes' numerics and of RTN (no calibration).
  """
  shared = {} if shared is None else shared
  seed_dir = wd.seed_dir(root, seed)
  os.makedirs(wd.path(seed_dir, wd.RESULTS_DIR), exist_ok=True)
  names = lm_quant.settings(config)
  p = progress.Progress("lm", 1 + len(names), prefix=f"seed {seed}")
  setup = _setup(config, root, seed, seed_dir, shared, p)
  texts, built, enc, fp_scores = (setup[k] for k in ("texts", "built", "enc", "fp_scores"))
  model, params, tokenizer = built["model"], built["params"], built["tokenizer"]
  family = LM_FAMILIES.get(built["family"])
  modules = list(family.hf_modules(model.config).values()) if family.hf_modules else []
  kw = dict(num_samples=config.bootstrap, seed=seed)
  rows = {FLOAT: _row(lm_eval.summarize(fp_scores, texts["crows"], texts["stereoset"], **kw),
                      {})}
  p.done(FLOAT, extra=_headline(rows[FLOAT]))
  calib = calibration(config, texts, tokenizer, seed)
  cache = lm_quant.AnalysisCache(seed_dir)
  for name in names:
    path = wd.result_path(seed_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        rows[name] = json.load(f)["row"]
      if lm_quant.METHODS.parse(name)[0].kind == "numerics":  # what the kernels are stored in
        rows[name]["avg_bits"] = lm_quant.numeric_setting(name, model, params)[1]["avg_bits"]
      p.done(name, reused=True)
      continue
    method = lm_quant.METHODS.parse(name)[0]
    numeric = method.kind == "numerics"
    if numeric:  # a runtime's numerics: the same params, another model
      (qmodel, info), qparams, records = lm_quant.numeric_setting(name, model, params), params, {}
    else:
      qmodel = model
      qparams, records, info = lm_quant.quantize(name, model, params, calib, config,
                                                 model.config.n_layers, modules, cache)
    # A runtime's numerics and round to nearest see no calibration: on a fixed
    # pre-trained model their scores are the same for every seed.
    seed_free = (numeric or method.name == "rtn") and config.model.source != "train"
    key = ("scores", name)
    scores = (shared[key] if seed_free and key in shared
              else lm_eval.score(qmodel, {"params": qparams}, enc))
    if seed_free:
      shared[key] = scores
    summary = lm_eval.summarize(scores, texts["crows"], texts["stereoset"], fp_scores, **kw)
    rows[name] = _row(summary, info)
    if config.export and numeric:
      info["export"] = None  # an LM export holds baq's grid, not a runtime's numerics
    elif config.export:
      info["export"], record = exports.export(config, seed_dir, name, family, model.config,
                                              params, qparams, records, built)
      if record is not None:
        info[config.export] = record
    layers = {k: {f: v for f, v in r.items() if f not in ("codes", "scales")}
              for k, r in records.items()}
    if launch.is_primary():
      with open(path + ".tmp", "w") as f:
        json.dump(wd.jsonable(dict(row=rows[name], info=info, summary=summary, layers=layers)),
                  f)
      os.replace(path + ".tmp", path)
    p.done(name, extra=_headline(rows[name]))
  if launch.is_primary():
    wd.write_json(wd.path(seed_dir, wd.SEED_REPORT_FILE), wd.jsonable(rows))
  return rows


def format_table(runs: dict[int, dict], title: str = "") -> str:
  """Mean +- std over seeds per setting.

  `sig` counts the seeds whose exact McNemar test of the score change rejects
  at 0.05, and `flips -/+` gives McNemar's discordant pairs (mean over seeds):
  pairs whose stereotype preference the quantized model dropped / took up;
  `gap` is the mean stereotype gap ll(sent_more) - ll(sent_less) in nats,
  and `gsig` the seeds whose Wilcoxon test of its change rejects. SS and
  ICAT are StereoSet's intrasentence task (`inter`: intersentence), when
  scored; `ppl ood` the out-of-domain text's perplexity, when given.
  """
  seeds = sorted(runs)
  first = runs[seeds[0]]
  has = lambda key: any(key in r for r in first.values())
  cols = [("CrowS score", 14), ("change", 14), ("sig", 4), ("flips -/+", 10), ("gap", 15),
          ("gap change", 15), ("gsig", 4), ("SS", 13), ("ICAT", 13)]
  cols += [("SS inter", 13)] if has("ss_inter") else []
  cols += [("perplexity", 15)] + ([("ppl ood", 17)] if has("ppl_ood") else [])
  head = f"{'setting':18s} {'bits':>5s}" + "".join(f" {c:>{w}s}" for c, w in cols)
  lines = [f"Mean +- std over seeds {seeds} "
           f"({title or 'SYNTHETIC data when data.kind=synthetic'})", head]

  def ms(key, name, digits=2):
    v = [runs[s][name].get(key, np.nan) for s in seeds]
    return "-" if np.isnan(v).all() else f"{np.mean(v):6.{digits}f} +- {np.std(v):4.{digits}f}"

  def sig(key, name):
    if key not in first[name]:
      return "-"
    return f"{sum(runs[s][name][key] < 0.05 for s in seeds)}/{len(seeds)}"

  def flips(name):
    if "flips_away" not in first[name]:
      return "-"
    return "/".join(f"{np.mean([runs[s][name][k] for s in seeds]):.0f}"
                    for k in ("flips_away", "flips_to"))

  for name in first:
    cells = [ms("crows", name), ms("change", name), sig("p", name), flips(name),
             ms("gap", name, 3), ms("gap_change", name, 3), sig("gap_p", name),
             ms("ss", name), ms("icat", name)]
    cells += [ms("ss_inter", name)] if has("ss_inter") else []
    cells += [ms("ppl", name, 3)] + ([ms("ppl_ood", name, 3)] if has("ppl_ood") else [])
    lines.append(f"{name:18s} {first[name]['avg_bits']:5.2f}"
                 + "".join(f" {c:>{w}s}" for c, (_, w) in zip(cells, cols)))
  return "\n".join(lines)


def check(config) -> None:
  """Refuses bad bits, budgets, alphas, numerics or an unknown export before any work."""
  launch.seeds(config)
  checks.at_least(config, {"train.steps": 1, "train.batch_size": 1, "train.save_every": 1,
                           "train.warmup_steps": 0, "quant.calib_sequences": 1, "bootstrap": 1,
                           "quant.max_pairs_per_type": 0, "data.heldout_tokens": 0,
                           "data.num_train": 1, "data.num_heldout": 1, "data.max_len": 2})
  texts_.text_unit(config)
  lm_quant.settings(config)
  MODEL_SOURCES.get(config.model.source)  # an unknown name lists the valid ones
  if config.export:
    EXPORTS.get(config.export)  # an unknown name lists the valid ones
  exports.scale_dtype(config)
  lm_quant.grid(config)


def run(config, root: str) -> dict:
  """Runs every seed of `config.seeds`; process 0 writes WORKDIR/summary.json and
  prints the table.

  Returns:
    {seed: {setting: metrics}}.
  """
  check(config)
  shared = {}
  runs = {s: run_seed(config, root, s, shared) for s in launch.seeds(config)}
  if launch.is_primary():
    wd.write_json(wd.path(root, wd.SUMMARY_FILE), wd.jsonable(runs))
    title = ("SYNTHETIC data" if config.data.kind == "synthetic"
             else f"data from files, model source {config.model.source}")
    print(format_table(runs, title), flush=True)
  return runs
