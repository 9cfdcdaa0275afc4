"""The CLIP bias study ("quantization induces inconsistent biases").

  __main__   the command line (python -m baq.study.vlm)
  study      per seed: every quantizer's cells and verdicts, the summary
  quant      the quantizers and model sources
  data       the data kinds (synthetic, FairFace, FACET, an image folder)
"""
