"""Post-training quantization of whole models, above the models it walks.

  sequential  GPTQ / Fair-GPTQ layer by layer over any Flax model built from
              nn.Dense / nn.Conv (the bias study's PTQ cells)
  decoder     GPTQ / Fair-GPTQ block by block over a causal language model
  decoder_group  one block's projections: statistics, the pair term, GPTQ

The one-matrix GPTQ solver is baq.quant.gptq.
"""
