"""The chain as run_all.sh runs it: its steps and their files (``chain``) and what a work folder holds (``workstate``).

``chain`` is the one place the steps' names, the files each reads and writes for a batch size and model,
and their commands are spelled; run_all.sh, the fidelity report, the benchmarks and the tests ask it.
``workstate`` decides which steps a rerun can skip (content keys), records them and prints the summary.
"""
