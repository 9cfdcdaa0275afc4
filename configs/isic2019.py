r"""ISIC 2019 by sex or age band (FairQuant's ISIC setting), BAQ at 4.0 bits.

Place the official files in one folder (see README, Datasets), then:

  python train.py --config=configs/isic2019.py:resnet18,sex --workdir=/tmp/baq_isic_r18 \
    --config.dataset.kwargs.manual_dir=/data/isic2019
  python train.py --config=configs/isic2019.py:deit_tiny,sex --workdir=/tmp/baq_isic_deit \
    --config.dataset.kwargs.manual_dir=/data/isic2019

The argument is "model,group[,runlocal]": model small_cnn | resnet18 |
resnet50 | deit_tiny | tinyvit_5m; group sex | age. On CPU, the shared 64x64
HAM subset runs with the small CNN:

  python train.py --config=configs/isic2019.py:small_cnn,sex --workdir=/tmp/baq_ham \
    --config.dataset.kwargs.manual_dir=../shared/data/isic2019_ham_subset
"""

from configs import papers


def get_config(arg=None):
  """ISIC 2019, binary malignant-vs-benign label, groups by sex or age."""
  model, group, runlocal = papers.parse(arg, "resnet18", "sex")
  if group not in ("sex", "age"):
    raise ValueError(f"Unknown ISIC 2019 grouping {group!r}. Valid: sex, age.")
  return papers.paper_config(
      "isic2019",
      dict(group_by=group, missing="drop", label="malignant", age_edges=(30, 60)),
      model, image_size=64, positive_class=1, runlocal=runlocal)
