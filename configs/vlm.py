"""The CLIP study ("quantization induces inconsistent biases"): quantizers x groups x seeds.

The embedded default (SYNTHETIC data, offline, minutes on 2 CPU cores):

  python -m baq.study.vlm --config=configs/vlm.py --root=/tmp/baq_vlm --seeds=0,1,2

A small CLIP is trained in the run on synthetic lesion images and captions
that name the class ("a dermoscopic image of a malignant lesion"); then
every quantizer of `quantizers` is scored on zero-shot classification per
skin type and on retrieval skew over skin types for neutral queries
("a dermoscopic image of a lesion"), against the full-precision model with
paired tests. `configs/vlm.py:tiny` is the tests' seconds-long version.
"""

import ml_collections


def get_config(arg=None):
  """`arg`: None for the embedded default, "tiny" for the tests."""
  if arg not in (None, "tiny"):
    raise ValueError(f"Unknown configs/vlm.py argument {arg!r}. Valid: tiny.")
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"       # baq.data.vlm.synthetic (labelled SYNTHETIC everywhere)
  c.data.seed = 0                 # the image set's seed (the same set for every model seed)
  c.data.num_images = 3000
  c.data.image_size = 32
  c.data.test_fraction = 0.3
  c.data.max_len = 16             # caption tokens (longer ones are cut)

  c.model = ml_collections.ConfigDict()
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

  # baq.study.vlm_quant.QUANTIZERS; an unknown name lists the valid ones.
  c.quantizers = "fp32,rtn8,rtn4,llm_int8,nf4,dynamic_int8,mixed4"
  c.quant = ml_collections.ConfigDict()
  # Layers every quantizer quantizes: the towers' blocks and the projections.
  c.quant.layers = r"(vision|text)/block_\d+/(attn|mlp)/.*|visual_projection|text_projection"
  c.quant.measure = "loss"        # mixed4's layer importance (importance.MEASURES)
  c.quant.reducer = "max"         # across skin types
  c.quant.calib_images = 256      # mixed4's calibration images (from the training split)
  c.retrieval_k = "20,100"        # MaxSkew@k / MinSkew@k / NDKL at each k (the first is tabled)
  c.bootstrap = 1000
  if arg == "tiny":
    c.data.num_images, c.train.steps, c.train.save_every = 300, 30, 15
    c.train.warmup_steps = 5
    c.model.width, c.model.layers, c.model.embed_dim = 32, 1, 32
    c.quantizers = "fp32,rtn4,llm_int8,nf4,dynamic_int8,mixed4"
    c.quant.calib_images, c.retrieval_k, c.bootstrap = 64, "10", 50
  return c
