"""Image decoding and the fixed view the tokens are computed on.

This module is the contract between the writer (tokenize stage) and the reader (training loader):
both call :func:`decode_view` on the stored image bytes, so a token grid always matches the exact
pixels the trainer sees.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
              "PPM": "ppm"}

# Skip reasons, as counted in the manifest and written in the per-shard index.
EMPTY = "empty"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
NO_IMAGE = "no_image"
# warnings filters are process-global (before Python 3.14): decoder threads must not interleave them.
_OPEN_LOCK = threading.Lock()


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
    """Decoded view: ``pixels`` uint8 [S, S, 3]; ``geometry`` maps it back to the source image."""

    pixels: np.ndarray
    geometry: dict
    ext: str


class SkipImage(Exception):
    """Raised for an input that is skipped and counted; ``reason`` is one of the module's skip reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


def decode_view(data: bytes, pre: Preprocess) -> View:
    """Decode image bytes into the center-cropped RGB view; raises :class:`SkipImage` for bad input.

    Thread-safe; PIL releases the GIL while it decodes and resizes, so threads decode in parallel."""
    if not data:
        raise SkipImage(EMPTY)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():  # open parses the header only; PIL's bomb check is there
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        fmt = img.format or ""
        if img.width * img.height > pre.max_image_pixels:
            raise SkipImage(BOMB, f"{img.width}x{img.height} pixels")
        img.load()
    except SkipImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage(BOMB, str(e)) from None
    except UnidentifiedImageError as e:
        raise SkipImage(UNDECODABLE, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = TRUNCATED if "truncat" in str(e).lower() or isinstance(e, EOFError) else UNDECODABLE
        raise SkipImage(reason, str(e)) from None
    img = ImageOps.exif_transpose(img)
    w, h = img.size
    if min(w, h) < pre.min_image_size:
        raise SkipImage(TOO_SMALL, f"{w}x{h} < {pre.min_image_size}")
    img = _to_rgb(img)
    s = pre.image_size
    scale = s / min(w, h)
    nw, nh = (s, max(s, round(h * scale))) if w <= h else (max(s, round(w * scale)), s)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - s) // 2, (nh - s) // 2
    img = img.crop((left, top, left + s, top + s))
    geometry = {"source_size": [w, h], "resized": [nw, nh], "crop_box": [left, top, left + s, top + s],
                "flip": False}
    return View(np.asarray(img, dtype=np.uint8), geometry, FORMAT_EXT.get(fmt, fmt.lower() or "bin"))
