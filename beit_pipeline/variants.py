"""The BEiT variants the pipeline knows, as plain data.

Kept apart from beit_model.py (which imports torch and timm, seconds of start-up)
so that run_all.sh can check --model before any step runs.
"""

# The published BEiT variants, by the shapes that identify them.
KNOWN_VARIANTS = {
    # name: (embed_dim, depth, num_heads, img_size)
    "beit_base_patch16_224": (768, 12, 12, 224),
    "beit_base_patch16_384": (768, 12, 12, 384),
    "beit_large_patch16_224": (1024, 24, 16, 224),
    "beit_large_patch16_384": (1024, 24, 16, 384),
    "beit_large_patch16_512": (1024, 24, 16, 512),
    # Not a published model: a small BEiT of the same structure (197 tokens at 224)
    # that keeps tests fast.  Every code path is the same as for base.
    "beit_tiny_test_patch16_224": (64, 2, 2, 224),
}
