"""Data for baq: datasets, the SYNTHETIC dermatology-like set, batching.

  * `load(name, split)` returns an in-memory `Split` of a dataset registered
    in `DATASETS` (e.g. 'synthetic_derm').
  * `counterfactual_pairs` renders the same synthetic lesions on chosen skin
    types.
  * `Batcher` and `eval_batches` turn a `Split` into deterministic batches.
  * `synthetic` renders the synthetic set in numpy; `synthetic_builder` (not
    imported here, it imports tensorflow-datasets) writes it with tfds.
"""

from baq.data.synthetic import generate as synthetic
from baq.data.datasets import DATASETS, Split, counterfactual_pairs, load
from baq.data.pipeline import Batcher, eval_batches, normalize

__all__ = [
    "DATASETS", "Batcher", "Split", "counterfactual_pairs", "eval_batches",
    "load", "normalize", "synthetic",
]

# Real datasets read from files the user placed (a manual directory);
# importing them registers 'isic2019', 'fitzpatrick17k', 'celeba' and
# 'image_folder_csv' in DATASETS. None imports tensorflow-datasets until used.
from baq.data.manual import celeba, fitzpatrick17k, folder, isic2019  # noqa: E402
