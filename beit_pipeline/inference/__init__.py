"""Step 5 off the Ascend device: ais_bench's command line and output files over ONNX Runtime or OpenVINO.

``options`` parses ais_bench's flags (identical, ignored with a reason, or refused); ``runner`` runs one
device's batches; ``devices`` shares the inputs over ``--device`` as ais_bench does; ``folder`` owns the
output folder (what we wrote, what we may remove); ``record`` and ``summary`` write our record and
ais_bench's summary; ``sessions`` is the one place an ONNX model is opened, run and compared; ``engines``
chooses engine and precision; ``outputs`` reads and writes ais_bench's output files; ``ascend`` is what
run_all.sh asks about CANN's tools.
"""
