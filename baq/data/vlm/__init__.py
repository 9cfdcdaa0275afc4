"""Data for the vision-language (CLIP-like) bias study: loaders and a SYNTHETIC set.

  fairface   `load_fairface`: FairFace's fairface_label_{train,val}.csv
             (Karkkainen & Joo 2021, github.com/joojs/fairface) as image
             paths and age / gender / race group codes
  facet      `load_facet`: FACET's annotations.csv (Gustafson et al. 2023,
             facet.metademolab.com) as image paths, person boxes, person
             classes and perceived gender presentation / skin tone / age
             group codes; `read_images` decodes paths (cropping FACET's
             person boxes) into uint8 arrays
  synthetic  `generate`: a SYNTHETIC image-caption set rendered by
             `baq.data.synthetic` (lesions over Fitzpatrick skin types) with
             class prompts and neutral retrieval queries; no real data

The loaders are lazy: they return paths, and nothing is decoded until
`read_images` is called. The metrics computed from a model's embeddings
(zero-shot accuracy disparities, retrieval skew, paired tests) are pure
functions in `baq.fairness.vlm_metrics`; nothing here runs a model.
"""

from baq.data.vlm.facet import Facet, load_facet, read_images
from baq.data.vlm.fairface import FairFace, load_fairface
from baq.data.vlm.synthetic import SyntheticVLM, generate

__all__ = ["Facet", "FairFace", "SyntheticVLM", "generate", "load_facet",
           "load_fairface", "read_images"]
