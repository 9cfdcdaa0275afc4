"""Real datasets read from files the user placed in a manual directory.

  files    checks, CSV tables, images and splits shared by every loader
  builder  the tensorflow-datasets builder of manual files, and
           `register_manual`, which makes a table function a dataset
  isic2019, fitzpatrick17k, celeba, folder: one dataset each

`baq.data.DATASETS` imports every module here on its first lookup: a new
dataset is one new module that calls `builder.register_manual`, and no other
file changes. Nothing here imports tensorflow-datasets until a split is loaded.
"""
