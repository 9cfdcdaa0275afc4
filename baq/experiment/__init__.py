"""baq.experiment."""
