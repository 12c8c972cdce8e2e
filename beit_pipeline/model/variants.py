"""The BEiT variants the pipeline knows, as plain data.

Kept apart from build.py (which imports torch and timm, seconds of start-up)
so that run_all.sh can check --model before any step runs.
"""

from __future__ import annotations

# The published BEiT variants, by the shapes that identify them.
KNOWN_VARIANTS = {
    # name: (embed_dim, depth, num_heads, img_size)
    "beit_base_patch16_224": (768, 12, 12, 224),
    "beit_base_patch16_384": (768, 12, 12, 384),
    "beit_large_patch16_224": (1024, 24, 16, 224),
    "beit_large_patch16_384": (1024, 24, 16, 384),
    "beit_large_patch16_512": (1024, 24, 16, 512),
    # Not published models: small BEiTs of the same structure (197 tokens at 224, 577 at
    # 384) that keep tests fast.  Every code path is the same as for base.
    "beit_tiny_test_patch16_224": (64, 2, 2, 224),
    "beit_tiny_test_patch16_384": (64, 2, 2, 384),
}

# unilm's fine-tuned ImageNet-1k classifiers (github.com/microsoft/unilm, beit/README.md), by variant.
PUBLISHED_CHECKPOINTS = {
    "beit_base_patch16_224": "beit_base_patch16_224_pt22k_ft22kto1k.pth",
    "beit_base_patch16_384": "beit_base_patch16_384_pt22k_ft22kto1k.pth",
    "beit_large_patch16_224": "beit_large_patch16_224_pt22k_ft22kto1k.pth",
    "beit_large_patch16_384": "beit_large_patch16_384_pt22k_ft22kto1k.pth",
    "beit_large_patch16_512": "beit_large_patch16_512_pt22k_ft22kto1k.pth",
}


def image_size(name: str) -> int:
    """The input size (pixels per side) of a known variant."""
    return KNOWN_VARIANTS[name][3]


def token_count(size: int, patch: int = 16) -> int:
    """Tokens of a BEiT at ``size``: the cls token and (size / patch)^2 patches (224: 197, 384: 577, 512: 1025)."""
    return 1 + (size // patch) ** 2
