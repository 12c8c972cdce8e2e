"""What the pipeline is fed when no ImageNet is given: the demo, real photographs and synthetic images.

``demo`` writes the built-in demo folder; ``photos`` and ``photo_variants`` scikit-image's bundled
photographs and seeded variants of them; ``synthetic`` seeded pictures in every PIL mode.
"""
