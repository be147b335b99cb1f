"""hf-moe's lab: benchmark suites run as `python -m benchmarks <suite> [options]` (see benchmarks/README.md)."""
