"""Step 2's side: checkpoints in every common form, the BEiT variant they describe, timm modules, ONNX export.

``checkpoints`` reads unilm, DDP, EMA, timm safetensors and Hugging Face forms without running code;
``variants`` is the known variants as plain data (no torch import); ``build`` makes timm's BEiT from a
state dict; ``export`` writes and verifies the ONNX file.
"""
