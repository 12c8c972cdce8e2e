"""Benchmarks behind beit_bench.py and beit_fidelity_bench.py: whole-step timings and the fidelity report's cost."""
