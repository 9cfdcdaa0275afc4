"""baq.ptq."""
