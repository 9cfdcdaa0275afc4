"""Speed and result measurements: run as `python -m benchmarks.<name>` from the repository root."""
