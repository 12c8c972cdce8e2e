"""The BEiT offline-inference pipeline's library; the guide's scripts at the top level are thin over it.

Modules, by what they hold (README, "How the code is laid out"):
errors, cli       the error type with its exit code; logging, signals, the one error printer
files             atomic writes, folder locks
batches, outputs  batch files + manifest; ais_bench's output files
labels            val_label.txt and the matching of its entries to images
fingerprint       content hashes (cached by size and mtime), image-set fingerprints, tool versions
workstate         run_all.sh's memory: which step is complete for which inputs, the summary table
variants, model   the BEiT variants; checkpoints in, timm modules out
synthetic         synthetic images for tests, the demo and benchmarks
"""
