"""Data for baq: datasets, the SYNTHETIC dermatology-like set, batching.

  * `load(name, split)` returns an in-memory `Split` of a dataset registered
    in `DATASETS` (e.g. 'synthetic_derm', 'isic2019').
  * `counterfactual_pairs` renders the same synthetic lesions on chosen skin
    types.
  * `Batcher` and `eval_batches` turn a `Split` into deterministic batches.

Subpackages: `baq.data.synthetic` (`render`, `generate`: the synthetic set in
numpy; `builder`: its tfds builder) and `baq.data.manual` (real datasets from
files the user placed, one module each). `DATASETS` imports every module of
`baq.data.manual` on its first lookup, so a new dataset is one new file there
and nothing here names one. None imports tensorflow-datasets until a dataset
is loaded.
"""

from baq.data.datasets import DATASETS, Split, counterfactual_pairs, load
from baq.data.pipeline import Batcher, eval_batches, normalize

__all__ = [
    "DATASETS", "Batcher", "Split", "counterfactual_pairs", "eval_batches",
    "load", "normalize",
]
