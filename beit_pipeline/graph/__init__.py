"""ONNX graphs: the index and declarative path matcher every rewrite uses, the rewrites themselves, and files.

``index`` keeps producers and consumers right while a pass inserts and removes nodes and matches paths
anchored on an op (``match_parent_path``, as ONNX Runtime's fusion code does); ``patterns`` finds BEiT's
structures with it (attention, LayerNorm, the pooling); ``padding`` is graph_modify.py's 197 -> 208 rewrite
and the guide's own; ``onnx_files`` reads and writes models past protobuf's 2 GiB; ``simplify`` runs onnxsim
with the weights held out, and ``simplify_checked`` keeps onnxsim's result only when ``inference.sessions`` (the one
place a model is run) finds it computes what its input does.
"""
