"""The SYNTHETIC dermatology-like set: render (numpy), generate, tfds builder."""
