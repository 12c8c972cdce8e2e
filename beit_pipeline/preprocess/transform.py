"""unilm BEiT's eval transform, computed exactly as torchvision computes it on a PIL image.

    img.convert("RGB") -> Resize(R, bicubic, short side) -> CenterCrop(S)
    -> ToTensor -> Normalize(mean=0.5, std=0.5)

S is the model's input size and R follows unilm's rule (beit/datasets.py, build_transform):
below 384 px, R = int(S / (224 / 256)) (256 at 224); at 384 and above crop_pct is 1.0, R = S.
The size is a process setting (``use_image_size``), made before any pool worker forks.

``preprocess_image(path)`` is the whole transform for one file; ``load_crop`` and
``to_float`` are its two halves (uint8 crop, then float32), which the folder run
(runner.py) calls apart so that the crops can come from worker processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile

from beit_pipeline.errors import BadImageError
from beit_pipeline.preprocess.batches import IMAGE_SIZE

if TYPE_CHECKING:
    import torchvision

RESIZE_SIZE = 256  # unilm: int(224 / crop_pct) with crop_pct = 224 / 256
CROP_SIZE = IMAGE_SIZE  # the default size; the active one is geometry().crop
MEAN = 0.5  # unilm's IMAGENET_INCEPTION_MEAN/STD, the same for the three channels
STD = 0.5
# Pillow's own default; an image above it is refused as a possible decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485
UNILM_FULL_CROP_FROM = 384  # unilm's build_transform: crop_pct = 1.0 from this size up


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The resize (short side) and centre-crop sizes of the eval transform for one model input size."""

    resize: int
    crop: int

    @classmethod
    def for_size(cls, size: int) -> Geometry:
        """unilm's rule: below 384, Resize(int(size / (224/256))); from 384, Resize(size) (crop_pct 1.0)."""
        return cls(int(size / (224 / 256)) if size < UNILM_FULL_CROP_FROM else size, size)

    @property
    def description(self) -> str:
        return (f"PIL convert('RGB') -> Resize({self.resize}, bicubic, short side) -> CenterCrop({self.crop}) "
                "-> ToTensor -> Normalize(mean=0.5, std=0.5), as torchvision computes it on a PIL image")


_ACTIVE = [Geometry.for_size(IMAGE_SIZE)]  # the process setting; forked workers inherit it
TRANSFORM = _ACTIVE[0].description


def use_image_size(size: int) -> Geometry:
    """Make ``size`` the model input size of this process's transform; returns its Geometry."""
    _ACTIVE[0] = Geometry.for_size(size)
    return _ACTIVE[0]


def geometry() -> Geometry:
    """The Geometry in use (224 -> Resize 256 + CenterCrop 224 unless use_image_size changed it)."""
    return _ACTIVE[0]

# A truncated file must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def shown(path: str | bytes) -> str:
    """``path`` printable in any locale: bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def reference_transform(size: int = IMAGE_SIZE) -> torchvision.transforms.Compose:
    """unilm's eval transform for input ``size`` as a torchvision Compose (for tests and benchmarks)."""
    from torchvision import transforms
    geo = Geometry.for_size(size)
    return transforms.Compose([
        transforms.Resize(geo.resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(geo.crop),
        transforms.ToTensor(),
        transforms.Normalize(mean=[MEAN] * 3, std=[STD] * 3),
    ])


def resize_geometry(width: int, height: int, size: int = RESIZE_SIZE,
                    crop: int = CROP_SIZE) -> tuple[int, int, int, int]:
    """(new_width, new_height, crop_top, crop_left) exactly as torchvision computes them.

    Resize: the short side becomes ``size`` and the long side is truncated with
    int() (torchvision's _compute_resized_output_size); CenterCrop rounds the
    offsets with round() (banker's rounding, as torchvision does).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return new_w, new_h, top, left


def _pillow_can_run_vertical_first():
    """Whether the installed Pillow runs the vertical pass first when the height shrinks a lot.

    Pillow 13 does (when the height loses more than twice as many pixels as
    the width); older versions always run the horizontal pass first.  The
    order changes the pixels, so ask Pillow itself, on an image where it shows.
    """
    y, x = np.mgrid[0:64, 0:8]
    img = Image.fromarray(((x * 89 + y * 53 + (x * y) % 7 * 31) % 256).astype(np.uint8), "L")
    both = img.resize((7, 16), Image.BICUBIC)
    horizontal_first = img.resize((7, 64), Image.BICUBIC).resize((7, 16), Image.BICUBIC)
    return both.tobytes() != horizontal_first.tobytes()


_VERTICAL_FIRST_EXISTS = _pillow_can_run_vertical_first()


def pillow_vertical_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Pillow's choice of pass order for img.resize((new_w, new_h)) (src/libImaging/Resample.c)."""
    shrink_h, shrink_w = height - new_h, width - new_w
    return _VERTICAL_FIRST_EXISTS and shrink_h > 0 and shrink_h > shrink_w * 2


def _source_span(start, count, in_size, out_size):
    """Source pixels [lo, hi) a bicubic pass reads for output pixels [start, start + count).

    The kernel reaches 2 source pixels, times the scale when shrinking; 2 more
    pixels of margin make float rounding irrelevant.
    """
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    lo = max(0, math.floor(start * scale - support) - 2)
    hi = min(in_size, math.ceil((start + count) * scale + support) + 2)
    return lo, hi


def _crop(img, box):
    return img if box == (0, 0) + img.size else img.crop(box)


def _on_canvas(part, size, offset):
    """``part`` pasted at ``offset`` on a black image of ``size``.

    A pass computes its coefficients from the full source length, so it must
    see the full length; the black pixels only feed outputs that are cropped away.
    """
    if part.size == size:
        return part
    canvas = Image.new(part.mode, size)
    canvas.paste(part, offset)
    return canvas


def resize_center_crop(img: Image.Image, size: int | None = None, crop: int | None = None) -> np.ndarray:
    """The centre crop (geometry() unless given) of the bicubic resize of an RGB PIL image, as uint8 (H, W, 3).

    Pillow's img.resize((w, h), BICUBIC) is two separable passes, each rounding
    to uint8.  Making the same two passes ourselves, in Pillow's order, gives
    identical pixels but lets each pass skip the rows or columns that the
    centre crop throws away (a tenth less time on 500x375 images), with no
    approximation: a resize with box= would be one, Pillow takes the box in float32.
    """
    size = geometry().resize if size is None else size
    crop = geometry().crop if crop is None else crop
    width, height = img.size
    new_w, new_h, top, left = resize_geometry(width, height, size, crop)
    if (new_w, new_h) == (width, height):  # torchvision returns the image itself then
        return np.asarray(img)[top:top + crop, left:left + crop]
    if pillow_vertical_first(width, height, new_w, new_h):
        x0, x1 = _source_span(left, crop, width, new_w)
        part = _crop(img, (x0, 0, x1, height)).resize((x1 - x0, new_h), Image.BICUBIC)  # vertical pass
        part = _on_canvas(part.crop((0, top, x1 - x0, top + crop)), (width, crop), (x0, 0))
        part = part.resize((new_w, crop), Image.BICUBIC)  # horizontal pass
        return np.asarray(part)[:, left:left + crop]
    y0, y1 = _source_span(top, crop, height, new_h)
    part = _crop(img, (0, y0, width, y1)).resize((new_w, y1 - y0), Image.BICUBIC)  # horizontal pass
    part = _on_canvas(part.crop((left, 0, left + crop, y1 - y0)), (crop, height), (0, y0))
    part = part.resize((crop, new_h), Image.BICUBIC)  # vertical pass
    return np.asarray(part)[top:top + crop]


def to_float(crops_chw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, the same float32 steps as ToTensor + Normalize."""
    if out is None:
        out = np.empty(crops_chw.shape, np.float32)
    np.copyto(out, crops_chw, casting="unsafe")
    out /= np.float32(255)
    out -= np.float32(MEAN)
    out /= np.float32(STD)
    return out


@dataclasses.dataclass(frozen=True)
class WideImage:
    """A decoded image whose file holds more than 8 bits per channel (PIL mode I;16, I or F)."""

    mode: str


def is_wide_mode(mode: str) -> bool:
    """PIL modes of more than 8 bits per channel, which convert("RGB") clips at 255: torchvision's loader does
    the same (mostly white images), so the bytes are kept and the run warns."""
    return mode in ("I", "F") or mode.startswith("I;16")


def decode_rgb(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> Image.Image:
    """Open and fully decode an image as RGB; raise BadImageError naming the file."""
    return decode_noting_mode(path)[0]


def decode_noting_mode(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> tuple[Image.Image, str]:
    """(the image as RGB, its file's PIL mode); BadImageError naming the file."""
    path = os.fspath(path)
    try:
        # Our own file object: closed on every path out, also when Pillow fails half-way.
        with open(path, "rb") as f, warnings.catch_warnings():
            # Image.open checks the size against Image.MAX_IMAGE_PIXELS: above twice the limit it raises
            # DecompressionBombError, between the limit and twice it only warns; made an error, we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            img.load()  # Pillow decodes lazily: force the whole file now so truncation shows
        return (img if img.mode == "RGB" else img.convert("RGB")), img.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"{shown(path)}: refused as a possible decompression bomb ({exc}); "
                            "raise --max_pixels if the image is genuine") from exc
    except Image.UnidentifiedImageError as exc:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise BadImageError(f"{shown(path)}: empty file (0 bytes)" if empty else
                            f"{shown(path)}: not a readable image (unknown format or corrupt header)") from exc
    except OSError as exc:
        if exc.errno is not None:  # the file itself: missing, dangling or looping symlink, permissions
            raise BadImageError(f"{shown(path)}: cannot open ({exc.strerror or exc})") from exc
        raise BadImageError(f"{shown(path)}: cannot decode ({exc})") from exc
    except Exception as exc:  # Pillow's plugins raise many kinds on corrupt data (ValueError, struct.error, ...)
        raise BadImageError(f"{shown(path)}: cannot decode ({type(exc).__name__}: {exc})") from exc


def load_crop(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> np.ndarray:
    """Decode ``path`` and return its resized centre crop as uint8 (3, S, S), S = geometry().crop."""
    crop = resize_center_crop(decode_rgb(path))
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


def preprocess_image(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> np.ndarray:
    """One image file -> float32 (3, S, S), equal to reference_transform() on img.convert("RGB")."""
    return to_float(load_crop(path))
