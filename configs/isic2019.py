r"""ISIC 2019 by sex or age band (FairQuant's ISIC setting), BAQ at 4.0 bits.

Place the official files in one folder (see docs/datasets.md), then:

  python train.py --config=configs/isic2019.py:resnet18,sex --workdir=/tmp/baq_isic_r18 \
    --config.dataset.kwargs.manual_dir=/data/isic2019
  python train.py --config=configs/isic2019.py:deit_tiny,sex --workdir=/tmp/baq_isic_deit \
    --config.dataset.kwargs.manual_dir=/data/isic2019

The argument is "model,group[,switches]": model small_cnn | resnet18 |
resnet50 | deit_tiny | tinyvit_5m; group sex | age (<30, 30-59, >=60).
Switches: "diagnosis" trains the challenge's multi-class diagnosis (melanoma
the positive class) instead of malignant vs benign; "cpu" sizes the run for a
2-core CPU; "runlocal" is a smoke run. The CPU pipeline on the shared 64x64
HAM subset, 3 seeds (docs/results.md, "ISIC 2019"):

  python -m baq.experiment.sweep --config=configs/isic2019.py:small_cnn,age,diagnosis,cpu \
    --workdir=/tmp/baq_ham_age --extra_bits= \
    --config.dataset.kwargs.manual_dir=../shared/data/isic2019_ham_subset
"""

from configs import papers


def get_config(arg=None):
  """ISIC 2019, malignant vs benign (or diagnosis), groups by sex or age band."""
  model, group, switches = papers.parse(arg, "resnet18", "sex", ("diagnosis",))
  if group not in ("sex", "age"):
    raise ValueError(f"Unknown ISIC 2019 grouping {group!r}. Valid: sex, age.")
  label = "diagnosis" if "diagnosis" in switches else "malignant"
  # Diagnosis classes in the challenge's order: MEL (0) first; else malignant = 1.
  return papers.paper_config(
      "isic2019",
      dict(group_by=group, missing="drop", label=label, age_edges=(30, 60)),
      model, image_size=64, positive_class=0 if label == "diagnosis" else 1,
      switches=switches)
