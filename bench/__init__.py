"""Benchmarks: serving load generator (serve.py), cache capacity (capacity.py), baselines,
and the GPU suite. Run them from the repository root as modules: `python -m bench.serve`."""
