"""The studies, one subpackage each with its own command line.

  bias     quantizers x bits x seeds on the image task, per-group tests and
           verdicts (python -m baq.study.bias)
  lm       GPTQ, Fair-GPTQ and mixed precision on a language model, CrowS-Pairs
           and StereoSet (python -m baq.study.lm)
  vlm      CLIP under the runtimes' numerics, "inconsistent biases"
           (python -m baq.study.vlm)
  compare  paired tests between two methods' finished runs
           (python -m baq.study.compare)
"""
