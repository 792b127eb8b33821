"""Image decoding and the fixed view the tokens are computed on.

This module is the contract between the writer (tokenize stage) and the reader (training loader):
both call :func:`decode_view` on the stored image bytes, so a token grid always matches the exact
pixels the trainer sees.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
# Pillow formats stored as they came, under an extension of IMAGE_EXTS (MPO is a JPEG with extra frames);
# an image in any other format is stored re-encoded as PNG (see :func:`decode_view`).
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
              "TIFF": "tiff", "PPM": "ppm"}
# Every format Pillow can open but EPS, whose decoder runs Ghostscript on the input.
Image.init()
_FORMATS = tuple(f for f in Image.OPEN if f != "EPS")

# Skip reasons, as counted in the manifest and written in the per-shard index.
EMPTY = "empty"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
NO_IMAGE = "no_image"
TOO_LARGE = "too_large"  # over max_image_bytes: never read
UNREADABLE = "unreadable"  # a local input file that fails to read or is no longer a regular file
BAD_LABEL = "bad_label"

# Pillow's own decompression-bomb check reads the process-global Image.MAX_IMAGE_PIXELS, also while loading
# (TIFF tiles, ICO and GIF frames). While decodes run it holds the largest of their limits; the value it had
# before is restored when the last one ends.
_LIMIT_LOCK = threading.Lock()
_limits: list[int] = []  # the limits of the decodes running now
_pillow_default: int | None = None


@contextlib.contextmanager
def _pillow_pixel_limit(limit: int) -> Iterator[None]:
    """Pillow's pixel limit is at least ``limit`` (pixels) while this decode runs."""
    global _pillow_default
    with _LIMIT_LOCK:
        if not _limits:
            _pillow_default = Image.MAX_IMAGE_PIXELS
        _limits.append(limit)
        Image.MAX_IMAGE_PIXELS = max(_limits)
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _limits.remove(limit)
            Image.MAX_IMAGE_PIXELS = max(_limits) if _limits else _pillow_default


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``image_size`` (bicubic), then center-crop ``image_size`` x ``image_size``."""

    image_size: int
    min_image_size: int = 8
    max_image_pixels: int = 89_478_485

    def describe(self) -> dict:
        return {
            "image_size": self.image_size,
            "resize": "shorter_side",
            "interpolation": "bicubic",
            "crop": "center",
            "exif_transpose": True,
            "mode": "RGB",
            "alpha": "composite_on_white",
            "high_bit_depth": "scaled_to_8bit",
            "min_image_size": self.min_image_size,
            "max_image_pixels": self.max_image_pixels,
        }


@dataclass(frozen=True)
class View:
    """Decoded view: ``pixels`` uint8 [S, S, 3]; ``geometry`` maps it back to the source image.

    ``data`` and ``ext`` are the image as a shard stores it: the input bytes when their format has an
    extension in IMAGE_EXTS, else a PNG of the oriented RGB image (which decodes to the same view)."""

    pixels: np.ndarray
    geometry: dict
    data: bytes
    ext: str


class SkipImage(Exception):
    """Raised for an input that is skipped and counted; ``reason`` is one of the module's skip reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data scales to 8 bit by the full 16-bit range; float data is taken as 0..255.
        if img.mode != "F":
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _check_pixels(img: Image.Image, pre: Preprocess) -> None:
    if img.width * img.height > pre.max_image_pixels:
        raise SkipImage(BOMB, f"{img.width}x{img.height} pixels > max_image_pixels ({pre.max_image_pixels})")


def _oriented_rgb(data: bytes, pre: Preprocess) -> tuple[Image.Image, str]:
    """(the EXIF-oriented RGB image, Pillow's format name) of image bytes; raises :class:`SkipImage`."""
    with _pillow_pixel_limit(pre.max_image_pixels):
        img = Image.open(io.BytesIO(data), formats=_FORMATS)  # parses the header only
        fmt = img.format or ""
        _check_pixels(img, pre)
        img.load()
        _check_pixels(img, pre)  # a frame may be larger than the header said (ICO)
        img = ImageOps.exif_transpose(img)
    w, h = img.size
    if min(w, h) < pre.min_image_size:
        raise SkipImage(TOO_SMALL, f"{w}x{h} < {pre.min_image_size}")
    return _to_rgb(img), fmt


def _skip_reason(e: Exception) -> str:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BOMB
    if isinstance(e, EOFError) or "truncat" in str(e).lower():
        return TRUNCATED
    return UNDECODABLE


def decode_view(data: bytes, pre: Preprocess) -> View:
    """Decode image bytes into the center-cropped RGB view; raises :class:`SkipImage` for bad input.

    Any error decoding, orienting or converting the image is a skip: decoders fed hostile bytes raise
    anything (struct.error, SyntaxError, TypeError, ...). Thread-safe; PIL releases the GIL while it decodes
    and resizes, so threads decode in parallel."""
    if not data:
        raise SkipImage(EMPTY)
    try:
        img, fmt = _oriented_rgb(data, pre)
        ext = FORMAT_EXT.get(fmt)
        if ext is None:  # a format the reader side does not list: store a PNG of exactly these pixels
            buf = io.BytesIO()
            img.save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
        w, h = img.size
        s = pre.image_size
        scale = s / min(w, h)
        nw, nh = (s, max(s, round(h * scale))) if w <= h else (max(s, round(w * scale)), s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        pixels = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8)
    except SkipImage:
        raise
    except Exception as e:  # noqa: BLE001 - one bad image must never end a job
        raise SkipImage(_skip_reason(e), f"{type(e).__name__}: {e}") from None
    geometry = {"source_size": [w, h], "resized": [nw, nh], "crop_box": [left, top, left + s, top + s],
                "flip": False}
    return View(pixels, geometry, data, ext)
