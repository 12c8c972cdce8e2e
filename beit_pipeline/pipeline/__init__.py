"""The chain as run_all.sh runs it: its steps and their files (``chain``) and what a work folder holds (``workstate``).

``chain`` is the one place the steps' names and the files each reads and writes for a batch size and model
are spelled; run_all.sh, the fidelity report, the HTML report and the benchmarks ask it (the commands stay in
run_all.sh, the guide's command lines as a user reruns them, their paths from ``chain``).
``workstate`` decides which steps a rerun can skip (content keys), records them and prints the summary.
"""
