"""The language-model bias study: GPTQ, Fair-GPTQ and mixed precision on a decoder.

  __main__   the command line (python -m baq.study.lm)
  study      per seed: the model, every setting, the table over seeds
  quant      the settings' names and how each is computed
  exports    config.export's formats (GPTQ folders, GGUF files) of each setting
  evaluate   CrowS-Pairs, StereoSet and perplexity of one model
"""
