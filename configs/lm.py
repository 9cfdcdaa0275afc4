"""The language-model study: GPTQ, Fair-GPTQ and fairness-aware mixed precision.

The embedded default (SYNTHETIC data, offline, minutes on 2 CPU cores):

  python -m baq.study.lm --config=configs/lm.py --workdir=/tmp/baq_lm --config.seeds="(0,1,2)"

A seeded templated corpus with a controlled occupation-group association
(`baq.data.text.synthetic`), a word-level tokenizer and a small GPT-2-style
model trained in the run; then, per seed, round-to-nearest, GPTQ and
Fair-GPTQ at each of `quant.bits` (Fair-GPTQ at each of `quant.alphas`), and
the group-aware mixed-precision allocation at each of `quant.budgets`,
scored on the synthetic CrowS-Pairs and StereoSet sets and held-out
perplexity, with paired tests against the full-precision model.

A local Hugging Face checkpoint and the real benchmark files instead:

  python -m baq.study.lm --config=configs/lm.py:hf --workdir=/tmp/baq_lm_opt \\
    --config.model.hf_folder=/models/opt-125m \\
    --config.data.crows_pairs=/data/crows_pairs_anonymized.csv \\
    --config.data.stereoset=/data/stereoset/dev.json \\
    --config.data.heldout=/data/wikitext2_test.txt --config.data.calibration=/data/c4_sample.txt

The trained stories260K Llama (a GGUF file) on the shared real data in
../shared/data/lm (paths resolved from the repository root):

  python -m baq.study.lm --config=configs/lm.py:stories --workdir=/tmp/baq_lm_stories
"""

import os

import ml_collections

# ../shared/data/lm beside the repository (see its README.md).
LM_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
                       "shared", "data", "lm")


def _lm_data(name: str) -> str:
  return os.path.normpath(os.path.join(LM_DATA, name))


def get_config(arg=None):
  """`arg`: None for the embedded synthetic default, "hf" for a local checkpoint,
  "stories" for the stories260K GGUF on the shared real data, "tiny" for the
  tests' seconds-long version of the default."""
  if arg not in (None, "hf", "stories", "tiny"):
    raise ValueError(f"Unknown configs/lm.py argument {arg!r}. Valid: hf, stories, tiny.")
  real = arg in ("hf", "stories")
  c = ml_collections.ConfigDict()
  c.seeds = (0,)  # model seeds: each trains (or loads) and quantizes its own model
  c.data = ml_collections.ConfigDict()
  # "synthetic": generated and written to ROOT/data; "files": the paths below.
  c.data.kind = "files" if real else "synthetic"
  c.data.seed = 0                 # the corpus seed (the same corpus for every model seed)
  c.data.association = 0.85       # P(stereotyped group word) in the synthetic corpus
  c.data.num_train = 20000        # synthetic training sentences
  c.data.num_heldout = 2000       # synthetic held-out sentences (perplexity)
  c.data.crows_pairs = ""         # crows_pairs_anonymized.csv ("files")
  c.data.stereoset = ""           # StereoSet dev.json or a folder of its CSVs ("files"; "": none)
  c.data.heldout = ""             # held-out text, one sentence or line per row ("files")
  c.data.calibration = ""         # calibration text ("files"; empty: the held-out text)
  c.data.calibration_pairs = ""   # CrowS-Pairs-layout pairs for calibration ("files")
  c.data.heldout_ood = ""         # an out-of-domain perplexity text ("files"; "": none)
  c.data.max_len = 32             # tokens per sequence (longer ones are cut)
  # How text becomes sequences (baq.study.lm.texts): "line" (a line is one
  # sequence) or "window" (lines cut into windows of max_len tokens; the
  # calibration sample is windows at seeded positions of the whole text).
  c.data.text_unit = "line"
  c.data.heldout_tokens = 0       # "window": scored tokens per perplexity text at most (0: all)

  c.model = ml_collections.ConfigDict()
  # "train": a GPT-2-style model of the fields below, trained on the corpus;
  # "hf": a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json);
  # "gguf": a GGUF file with its tokenizer (baq.study.lm.study.MODEL_SOURCES).
  c.model.source = {"hf": "hf", "stories": "gguf"}.get(arg, "train")
  c.model.hf_folder = ""
  c.model.gguf_file = ""
  c.model.d_model = 64            # multiples of 32, so GPTQ checkpoints can pack them
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.d_ff = 256

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.batch_size = 64
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.save_every = 200

  c.quant = ml_collections.ConfigDict()
  c.quant.bits = "2,3,4"            # uniform bit-widths of RTN, GPTQ and Fair-GPTQ
  c.quant.alphas = "0.1,1,10"       # Fair-GPTQ's pair weights (the reference default is 0.1)
  c.quant.budgets = "3.0,4.0"       # average-bit budgets of the mixed-precision allocation
  c.quant.choices = "2,3,4,8"       # bit-widths a GPTQ checkpoint holds
  # The runtimes' numerics on every block projection (baq.quant.numerics).
  c.quant.numerics = "llm_int8,nf4,dynamic_int8"
  c.quant.measure = "loss"          # layer importance (baq.allocation.importance.MEASURES)
  c.quant.reducer = "max"           # across groups (the LM loss and each bias type's pair loss)
  c.quant.mixed_alpha = 0.0         # the mixed allocation's GPTQ: 0 plain, > 0 Fair-GPTQ
  c.quant.group_size = None         # GPTQ group size (None: per output channel)
  c.quant.act_order = False
  # GPTQ/RTN scales: "float32", "float16" (what GGUF's blocks hold exactly), or
  # "auto": the export's (float16 for export="gguf", else float32).
  c.quant.scale_dtype = "auto"
  # GPTQ/RTN's symmetric grid (baq.quant.gptq.GRIDS): "full", GPTQ's 2^b levels
  # (scale 2 absmax / (2^b - 1), what GPTQModel writes and the GPTQ format and
  # llama.cpp's q4_0 hold), or "restricted", baq's fake_quant grid of 2^b - 1
  # (on stories260K 4-bit GPTQ perplexity 8.016 against 8.410; benchmarks/gptq_grids.py).
  c.quant.grid = "full"
  c.quant.calib_sequences = 256     # calibration sequences (from the training text)
  c.quant.pair_rows = "common"      # Fair-GPTQ pair alignment (baq.ptq.decoder_group.PAIR_ROWS)
  c.quant.pair_norm = "pairs"       # Fair-GPTQ pair normaliser (baq.ptq.decoder_group.PAIR_NORMS)
  c.quant.max_pairs_per_type = 0    # pairs of each bias type Fair-GPTQ and the importance use (0: all)
  # The Fair-GPTQ pairs and the importance's pair losses: "calibration" reads
  # data.calibration_pairs (the synthetic data's pairs from training
  # combinations, disjoint from the evaluation sets); "stereoset" uses
  # StereoSet's intrasentence stereotype / anti-stereotype candidates, as
  # the reference calibrates (they then overlap a StereoSet evaluation).
  c.quant.pair_source = "stereoset" if real else "calibration"
  # "gptq": a GPTQ-format checkpoint per quantized setting; "gguf": a GGUF file
  # for llama.cpp (baq.study.lm.exports)
  c.export = ""
  c.bootstrap = 1000                # bootstrap replicates of every interval
  if arg == "stories":
    # Three calibration seeds. stories260K is pre-trained and fixed: a seed
    # draws the calibration windows (and the bootstrap's resampling), so the
    # spread over seeds is that of the calibration sample, not of models;
    # full precision and the runtimes' numerics (no calibration) are the
    # same on every seed and are scored once.
    c.seeds = (0, 1, 2)
    c.model.gguf_file = _lm_data("stories260K.gguf")
    c.data.crows_pairs = _lm_data("crows_pairs_anonymized.csv")
    # StereoSet dev as the two CSVs of the folder (intrasentence and
    # intersentence), both scored; the intrasentence pairs are also the
    # Fair-GPTQ pairs and the importance's pair losses (quant.pair_source).
    c.data.stereoset = os.path.normpath(LM_DATA)
    # Perplexity in domain (TinyStories validation stories) and out of domain
    # (WikiText-2 test, its first 16,384 tokens), cut into windows.
    c.data.heldout = _lm_data("tinystories_valid_sample.txt")
    c.data.heldout_ood = _lm_data("wikitext2_test.txt")
    c.data.heldout_tokens = 16384
    # GPTQ's calibration text: Tiny Shakespeare, disjoint from both perplexity
    # texts (the TinyStories sample is too small to split: 18 stories, two
    # of them repeated).
    c.data.calibration = _lm_data("tinyshakespeare.txt")
    c.data.text_unit = "window"
    # The longest sentence scored is 152 tokens (a StereoSet intersentence
    # context and candidate; CrowS-Pairs 110): nothing is cut.
    c.data.max_len = 160
    c.quant.calib_sequences = 128   # windows of 159 tokens after <bos>
    # The first 128 intrasentence pairs of each bias type (race, profession,
    # gender, religion: 591 of 2,106): with all of them Fair-GPTQ took 150 s
    # a setting on 2 cores.
    c.quant.max_pairs_per_type = 128
    # 2 bits per channel leaves a 260K-parameter model unusable; 3 and 4 bits.
    c.quant.bits = "3,4"
    # llama.cpp's formats too. stories260K's rows are 64 wide (172 for
    # ffn_down): the k-quants' 256-blocks do not divide them, so q4_k takes
    # llama.cpp's fallback (q5_0), and ffn_down, 172 wide, no 32-block
    # divides: it stays float16 under every llama.cpp format.
    c.quant.numerics = "llm_int8,nf4,dynamic_int8,q8_0,q5_0,q4_0,q4_1,q4_k"
  if arg == "tiny":  # seconds on 2 CPU cores: a smoke run of every setting kind
    c.data.num_train, c.data.num_heldout = 3000, 200
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 1, 2, 64
    c.train.steps, c.train.warmup_steps, c.train.save_every = 60, 5, 30
    c.quant.bits, c.quant.alphas, c.quant.budgets = "4", "1", "3.0"
    c.quant.numerics = "nf4"
    c.quant.calib_sequences, c.bootstrap = 32, 50
  return c
