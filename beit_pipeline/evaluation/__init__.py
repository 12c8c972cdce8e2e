"""Step 6, outputs + labels -> Top-1/Top-5, with counts, intervals and the provenance of every input.

``accuracy`` scores output files against a label file; ``labels`` and ``label_formats`` read every common
label form (the guide's ``val_label.txt``, class folders, synsets, JSON, CSV); ``results`` writes the guide's
``acc_bs{N}.json`` byte for byte and our details beside it; ``stats`` holds the intervals and tests.
"""
