"""baq.study.bias."""
