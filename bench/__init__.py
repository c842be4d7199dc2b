"""edged's benchmarks: `python -m bench.run [NAME]` writes `bench/results/<name>.json`.

Benchmarks measure and never assert; every figure that matters is a ratio against a baseline
measured in the same run (see BENCHMARKS.md for the result format).
"""
