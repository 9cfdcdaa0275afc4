"""The CLIP study ("quantization induces inconsistent biases"): quantizers x groups x seeds.

The embedded default (SYNTHETIC data, offline, minutes on 2 CPU cores):

  python -m baq.study.vlm --config=configs/vlm.py --workdir=/tmp/baq_vlm --config.seeds="(0,1,2)"

A small CLIP is trained in the run on synthetic lesion images and captions
that name the class ("a dermoscopic image of a malignant lesion"); then
every quantizer of `quantizers` is scored on zero-shot classification per
skin type and on retrieval skew over skin types for neutral queries
("a dermoscopic image of a lesion"), against the full-precision model with
paired tests. `configs/vlm.py:tiny` is the tests' seconds-long version.

A pretrained checkpoint on real data (local files only; nothing is downloaded):

  python -m baq.study.vlm --config=configs/vlm.py:fairface --workdir=/tmp/baq_vlm_fairface \\
    --config.model.hf_folder=/models/clip-vit-base-patch32 --config.data.root=/data/fairface
  python -m baq.study.vlm --config=configs/vlm.py:facet --workdir=/tmp/baq_vlm_facet \\
    --config.model.hf_folder=/models/clip-vit-base-patch32 --config.data.root=/data/facet

FairFace is scored on retrieval skew of `data.queries` over gender, race and
age; FACET on zero-shot person classification per gender presentation, skin
tone and age group ("na" left out). `--config.data.max_images=500
--config.retrieval_k=20,100` makes a CPU-sized run. An OpenCLIP file
instead: `--config.model.source=open_clip --config.model.open_clip_weights=...
--config.model.open_clip_config=... --config.model.tokenizer=.../tokenizer.json`.
"""

import ml_collections


QUERIES = ("a photo of a person", "a photo of a doctor", "a photo of a nurse",
           "a photo of a criminal", "a photo of a thief", "a photo of a CEO",
           "a photo of a good person", "a photo of a bad person", "a photo of a smart person",
           "a photo of a kind person", "a photo of a dangerous person",
           "a photo of a hardworking person")


def get_config(arg=None):
  """`arg`: None for the embedded default, "tiny" for the tests, "fairface" / "facet" for a
  pretrained Hugging Face CLIP folder on those datasets."""
  if arg not in (None, "tiny", "fairface", "facet"):
    raise ValueError(f"Unknown configs/vlm.py argument {arg!r}. Valid: tiny, fairface, facet.")
  c = ml_collections.ConfigDict()
  c.seeds = (0,)  # model seeds: each trains (or loads) its own CLIP
  c.data = ml_collections.ConfigDict()
  # baq.study.vlm.data.DATA_KINDS: synthetic (labelled SYNTHETIC everywhere), fairface,
  # facet, image_folder (labels.csv with image,label,group columns and images/).
  c.data.kind = "synthetic" if arg in (None, "tiny") else arg
  c.data.root = ""                # the dataset folder (fairface, facet, image_folder)
  c.data.split = "val"            # FairFace's split (train, val)
  # Comma list of the kind's attributes; "" = all of them (synthetic: skin_type;
  # fairface: gender,race,age; facet: gender,skin_tone,age; image_folder: group).
  c.data.attributes = "gender,race,age" if arg == "fairface" else ""
  c.data.queries = QUERIES        # FairFace's neutral retrieval queries
  c.data.prompts = ("a photo of a {}",)  # zero-shot templates per class (facet, image_folder)
  c.data.max_images = 0           # real kinds: 0 reads all, else a seeded sample of this many
  c.data.missing_images = "error"  # or "skip": listed images that are absent
  c.data.seed = 0                 # the image set's seed (the same set for every model seed)
  c.data.num_images = 3000        # synthetic images
  c.data.image_size = 32          # source "train" (pretrained models use their own)
  c.data.test_fraction = 0.3      # source "train": the evaluated share
  c.data.max_len = 16             # caption tokens (longer ones are cut; source "train")

  c.model = ml_collections.ConfigDict()
  # baq.study.vlm.quant.SOURCES: "train" (the in-run CLIP of the fields below, trained on
  # the synthetic captions), "hf" (hf_folder: config.json, model.safetensors,
  # tokenizer.json) or "open_clip" (open_clip_weights .safetensors, open_clip_config
  # ViT-B-32.json, and tokenizer).
  c.model.source = "train" if arg in (None, "tiny") else "hf"
  c.model.hf_folder = ""
  c.model.open_clip_weights = ""
  c.model.open_clip_config = ""
  c.model.tokenizer = ""          # a tokenizer.json (open_clip; overrides hf_folder's)
  c.model.patch_size = 8
  c.model.width = 64              # both towers; MLPs are 4x wider
  c.model.layers = 2
  c.model.heads = 2
  c.model.embed_dim = 32

  c.train = ml_collections.ConfigDict()
  c.train.steps = 800
  c.train.batch_size = 64
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.save_every = 400

  # baq.study.vlm.quant.QUANTIZERS; an unknown name lists the valid ones.
  c.quantizers = "fp32,rtn8,rtn4,llm_int8,nf4,dynamic_int8,mixed4"
  c.quant = ml_collections.ConfigDict()
  # Layers every quantizer quantizes: the towers' blocks and the projections.
  c.quant.layers = r"(vision|text)/block_\d+/(attn|mlp)/.*|visual_projection|text_projection"
  c.quant.measure = "loss"        # mixed4's layer importance (importance.MEASURES)
  c.quant.reducer = "max"         # across the groups of quant.attribute
  # mixed4's calibration images: from the training split (source "train"), else held
  # out of the evaluated images (zero-shot kinds)
  c.quant.calib_images = 256
  c.quant.attribute = ""          # mixed4's groups: an attribute of the data ("" = the first)
  c.retrieval_k = "20,100"        # MaxSkew@k / MinSkew@k / NDKL at each k (the first is tabled)
  c.bootstrap = 1000
  return _variant(c, arg)


def _variant(c, arg):
  """The tests' tiny run, or the pretrained presets' quantizers and k."""
  if arg in ("fairface", "facet"):  # a ViT-B/32 on CPU: add mixed4 (facet) with a GPU at hand
    c.quantizers = "fp32,rtn8,rtn4,llm_int8,nf4,dynamic_int8"
  if arg == "fairface":
    c.retrieval_k = "100,1000"    # Berg et al.'s k on the 10,954 val images
  if arg == "tiny":
    c.data.num_images, c.train.steps, c.train.save_every = 300, 30, 15
    c.train.warmup_steps = 5
    c.model.width, c.model.layers, c.model.embed_dim = 32, 1, 32
    c.quantizers = "fp32,rtn4,llm_int8,nf4,dynamic_int8,mixed4"
    c.quant.calib_images, c.retrieval_k, c.bootstrap = 64, "10", 50
  return c
