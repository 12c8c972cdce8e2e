"""Synthetic images for the demo, the tests and the benchmarks.

There is no ImageNet here, so what the pipeline is fed when no real data is
given is made by this module: seeded, smooth-plus-noise pictures of many
sizes, in every PIL mode the preprocessing must handle, sometimes saved in a
format other than the one their name suggests (a PNG named ``.JPEG``), as
real-world folders have them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

# (width, height) pairs that exercise the resize/crop arithmetic: smaller than
# 224, odd, very wide, very tall, and the usual ImageNet 500x375.
AWKWARD_SIZES = [(500, 375), (375, 500), (224, 224), (100, 60), (60, 100), (257, 256), (1001, 97),
                 (97, 1001), (333, 227), (2000, 300), (256, 256), (31, 47)]
MODES = ["RGB", "L", "CMYK", "RGBA", "P", "I;16", "LA", "1"]


def synthetic_pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An RGB uint8 picture: smooth colour gradients, a few shapes, some noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 127.5 + 100 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, max(6, min(width, height) / 2))
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A PIL image of the given size and mode."""
    rgb = Image.fromarray(synthetic_pixels(rng, width, height), "RGB")
    if mode == "RGB":
        return rgb
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), np.uint16) * 257
        return Image.frombytes(
            "I;16", (width, height), grey.astype("<u2").tobytes())
    if mode == "RGBA":
        img = rgb.convert("RGBA")
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        img.putalpha(alpha)
        return img
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


def save_image(img: Image.Image, path: str, fmt: str | None = None, quality: int = 90) -> str:
    """Save ``img``; ``fmt`` may differ from the extension (a PNG named .JPEG)."""
    fmt = fmt or {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}.get(os.path.splitext(path)[1][1:].lower(), "PNG")
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        fmt = "PNG"  # JPEG cannot hold these modes; real folders then hold a PNG under a .JPEG name
    elif fmt == "PNG" and img.mode == "CMYK":
        fmt = "TIFF"  # nor PNG CMYK (image 35 of a set): still a file whose format is not its name's
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    img.save(path, format=fmt, **kwargs)
    return fmt


def imagenet_name(index: int) -> str:
    """ImageNet val file name of 0-based ``index``: ILSVRC2012_val_00000001.JPEG for 0."""
    return f"ILSVRC2012_val_{index + 1:08d}.JPEG"


def write_image_set(folder: str | os.PathLike[str], count: int, seed: int = 0,
                    sizes: Sequence[tuple[int, int]] | None = None, modes: Sequence[str] | None = None,
                    png_every: int = 5) -> list[str]:
    """Write ``count`` images named as ImageNet val into ``folder``; returns their names.

    Sizes and modes cycle through ``sizes``/``modes`` (default: all awkward
    sizes, all modes); every ``png_every``-th image is a PNG under a .JPEG name.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = sizes or AWKWARD_SIZES
    modes = modes or MODES
    names = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        mode = modes[i % len(modes)]
        name = imagenet_name(i)
        fmt = "PNG" if png_every and i % png_every == png_every - 1 else "JPEG"
        save_image(synthetic_image(rng, width, height, mode), os.path.join(folder, name), fmt)
        names.append(name)
    return names


def write_realistic_jpegs(folder: str | os.PathLike[str], count: int, seed: int = 0,
                          size: tuple[int, int] = (500, 375), quality: int = 90) -> list[str]:
    """RGB JPEGs of ImageNet's typical size and quality, for throughput benchmarks."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = imagenet_name(i)
        synthetic_image(rng, *size).save(os.path.join(folder, name), format="JPEG", quality=quality)
        names.append(name)
    return names
