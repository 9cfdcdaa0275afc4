"""baq.stats."""
