"""Real datasets read from files the user placed in a manual directory.

  files    checks, CSV tables, images and splits shared by every loader
  builder  the tensorflow-datasets builder of manual files
  isic2019, fitzpatrick17k, celeba, folder: one dataset each
"""
