"""The BEiT offline-inference pipeline's library; the guide's scripts at the top level are thin over it.

Modules are named for what they hold; README's "How the code is laid out" lists them, with where to add a
new stage or a new graph pattern (one list, not two that drift apart).
"""

from beit_pipeline import cli as _cli

# Before the scripts' heavy imports (torch, onnx): a Ctrl-C during them is one line and exit 130 (cli's docstring).
_cli.catch_interrupts()
