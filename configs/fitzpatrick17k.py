r"""Fitzpatrick17k by skin type (FairQuant's Fitzpatrick setting), BAQ at 4.0 bits.

Place fitzpatrick17k.csv and images/<md5hash>.jpg in one folder (see
docs/datasets.md), then:

  python train.py --config=configs/fitzpatrick17k.py:resnet18,six --workdir=/tmp/baq_f17k_r18 \
    --config.dataset.kwargs.manual_dir=/data/fitzpatrick17k
  python train.py --config=configs/fitzpatrick17k.py:deit_tiny,six --workdir=/tmp/baq_f17k_deit \
    --config.dataset.kwargs.manual_dir=/data/fitzpatrick17k

The argument is "model,groups[,runlocal|cpu]": model small_cnn | resnet18 |
resnet50 | deit_tiny | tinyvit_5m; groups six (types I-VI) | binary (I-III
vs IV-VI). The label is the three-way partition (benign, malignant,
non-neoplastic); malignant is the positive class.
"""

from configs import papers


def get_config(arg=None):
  """Fitzpatrick17k, three_partition_label, groups by skin type."""
  model, groups, switches = papers.parse(arg, "resnet18", "six")
  if groups not in ("six", "binary"):
    raise ValueError(f"Unknown Fitzpatrick17k grouping {groups!r}. Valid: six, binary.")
  # Classes are the label values in sorted order: benign, malignant, non-neoplastic.
  return papers.paper_config(
      "fitzpatrick17k", dict(groups=groups, label_column="three_partition_label"),
      model, image_size=64, positive_class=1, switches=switches)
