"""Image decoding and the views the tokens are computed on.

This module is the contract between the writer (tokenize stage) and the reader (training loader): both decode
the stored image bytes with :func:`decode_source` and draw a view with :func:`render` from its recorded geometry
(:func:`decode_view` for the center view, :func:`decode_views` for all of an image's views), so a token grid
always matches the exact pixels the trainer sees.
"""

from __future__ import annotations

import contextlib
import io
import math
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


@dataclass(frozen=True)
class ViewSpec:
    """The ``count`` views of each image: view 0 is the center view (the evaluation view); views 1.. are random
    resized crops (MAE's RandomResizedCrop: area share in ``scale``, aspect ratio in ``ratio``, log-uniform,
    10 attempts then a center crop), mirrored with probability ``flip``, each drawn from
    ``np.random.default_rng([seed, int(key, 16), view])``."""

    count: int = 1
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    seed: int = 0

    def describe(self) -> dict:
        return {"count": self.count, "view_0": "center", "crop": "random_resized", "scale": list(self.scale),
                "ratio": list(self.ratio), "ratio_sampling": "log_uniform", "attempts": 10, "fallback": "center",
                "flip": self.flip, "seed": self.seed, "interpolation": "bicubic",
                "rng": "numpy default_rng([seed, int(key, 16), view])"}


@dataclass(frozen=True)
class Views:
    """All views of one image: ``pixels`` uint8 [V, S, S, 3] (the training views), ``extract`` uint8 [V, N, N, 3]
    (the same boxes at the extractor's size N; ``pixels`` itself when N == S), ``geometry`` one dict per view,
    ``data`` / ``ext`` the image as a shard stores it."""

    pixels: np.ndarray
    extract: np.ndarray
    geometry: list[dict]
    data: bytes
    ext: str

    @property
    def source_size(self) -> list[int]:
        """[width, height] of the oriented source image in pixels."""
        return self.geometry[0]["source_size"]


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


@contextlib.contextmanager
def _as_skip() -> Iterator[None]:
    """Any error decoding, orienting, converting or rendering an image becomes a :class:`SkipImage`: decoders fed
    hostile bytes raise anything (struct.error, SyntaxError, TypeError, ...)."""
    try:
        yield
    except SkipImage:
        raise
    except Exception as e:  # noqa: BLE001 - one bad image must never end a job
        raise SkipImage(_skip_reason(e), f"{type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Source:
    """A decoded source image: ``image`` the EXIF-oriented RGB image; ``data`` and ``ext`` the image as a shard
    stores it (the input bytes when their format has an extension in IMAGE_EXTS, else a PNG of ``image``)."""

    image: Image.Image
    data: bytes
    ext: str


def decode_source(data: bytes, pre: Preprocess) -> Source:
    """Decode image bytes once; raises :class:`SkipImage` for bad input. Thread-safe; PIL releases the GIL while it
    decodes and resizes, so threads decode in parallel."""
    if not data:
        raise SkipImage(EMPTY)
    with _as_skip():
        img, fmt = _oriented_rgb(data, pre)
        ext = FORMAT_EXT.get(fmt)
        if ext is None:  # a format the reader side does not list: store a PNG of exactly these pixels
            buf = io.BytesIO()
            img.save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    return Source(img, data, ext)


def center_geometry(width: int, height: int, size: int) -> dict:
    """The center view of a ``width`` x ``height`` source (pixels) at ``size`` px: the shorter side resized to
    ``size`` (``resized``), then the center ``size`` x ``size`` square (``crop_box``, in resized pixels)."""
    scale = size / min(width, height)
    nw, nh = (size, max(size, round(height * scale))) if width <= height else (max(size, round(width * scale)), size)
    left, top = (nw - size) // 2, (nh - size) // 2
    return {"source_size": [width, height], "resized": [nw, nh], "crop_box": [left, top, left + size, top + size],
            "flip": False}


def _crop_box(width: int, height: int, views: ViewSpec, rng: np.random.Generator) -> list[int]:
    """torchvision's ``RandomResizedCrop.get_params`` in numpy: [left, top, right, bottom] in source pixels."""
    area, log_ratio = width * height, np.log(views.ratio)
    for _ in range(10):
        target = area * rng.uniform(*views.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return [left, top, left + w, top + h]
    ratio = width / height  # fallback: the central crop of the closest allowed aspect ratio
    w, h = ((width, int(round(width / views.ratio[0]))) if ratio < views.ratio[0] else
            (int(round(height * views.ratio[1])), height) if ratio > views.ratio[1] else (width, height))
    return [(width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h]


def random_geometry(width: int, height: int, views: ViewSpec, key: str, view: int) -> dict:
    """View ``view`` >= 1 of the source with hex ``key``: a random resized crop (``crop_box`` in source pixels,
    ``source_box`` marks it so) and a flip flag, a pure function of (``views.seed``, ``key``, ``view``)."""
    rng = np.random.default_rng([views.seed, int(key, 16), view])
    flip = bool(rng.random() < views.flip)
    return {"source_size": [width, height], "source_box": _crop_box(width, height, views, rng), "flip": flip}


def view_geometries(width: int, height: int, size: int, views: ViewSpec, key: str) -> list[dict]:
    """The geometry of each of the ``views.count`` views: the center view, then the random ones."""
    return [center_geometry(width, height, size)] + [random_geometry(width, height, views, key, v)
                                                       for v in range(1, views.count)]


def render(image: Image.Image, geometry: dict, size: int) -> np.ndarray:
    """The view ``geometry`` of the oriented RGB ``image`` at ``size`` px: uint8 [size, size, 3] (bicubic).

    The center view at its own size is resized then cropped; any other view or size resamples its box of
    source pixels straight to ``size`` x ``size``; then a flipped view is mirrored left-right."""
    if "source_box" in geometry:
        box = tuple(float(c) for c in geometry["source_box"])
    else:
        (w, h), (nw, nh), (left, top, right, bottom) = (geometry["source_size"], geometry["resized"],
                                                        geometry["crop_box"])
        if right - left == size:
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            return np.asarray(image.crop((left, top, right, bottom)), dtype=np.uint8)
        box = (left * w / nw, top * h / nh, right * w / nw, bottom * h / nh)
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)
    return np.ascontiguousarray(pixels[:, ::-1]) if geometry["flip"] else pixels


def geometry_problem(geometry: object) -> str | None:
    """Why a stored view geometry is not one :func:`render` draws (structure, a box of positive size inside the
    source, a flip flag), or None when it holds."""
    if not (isinstance(geometry, dict) and isinstance(geometry.get("flip"), bool)):
        return f"view geometry {geometry!r} has no flip flag"
    size = geometry.get("source_size")
    if not (_ints(size, 2) and min(size) > 0):
        return f"view geometry source_size {size!r} is not a positive width and height"
    bounds, box = size, geometry.get("source_box")
    if box is None:  # a center view: its crop box is in resized pixels
        bounds, box = geometry.get("resized"), geometry.get("crop_box")
        if not (_ints(bounds, 2) and min(bounds) > 0) or geometry["flip"]:
            return f"center view geometry {geometry!r} has no positive resized size or is flipped"
    if not (_ints(box, 4) and 0 <= box[0] < box[2] <= bounds[0] and 0 <= box[1] < box[3] <= bounds[1]):
        return f"view geometry crop box {box!r} is not a box of positive size inside {bounds!r}"
    return None


def _ints(value: object, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def decode_view(data: bytes, pre: Preprocess) -> View:
    """Decode image bytes into the center-cropped RGB view; raises :class:`SkipImage` for bad input."""
    source = decode_source(data, pre)
    geometry = center_geometry(*source.image.size, pre.image_size)
    with _as_skip():
        pixels = render(source.image, geometry, pre.image_size)
    return View(pixels, geometry, source.data, source.ext)


def decode_views(data: bytes, pre: Preprocess, views: ViewSpec, key: str, extract_size: int) -> Views:
    """Decode image bytes once and render the ``views.count`` views of the source with hex ``key``, at the training
    size and (when it differs) at ``extract_size`` px; raises :class:`SkipImage` for bad input."""
    source = decode_source(data, pre)
    geometry = view_geometries(*source.image.size, pre.image_size, views, key)
    with _as_skip():
        pixels = np.stack([render(source.image, g, pre.image_size) for g in geometry])
        extract = pixels if extract_size == pre.image_size else np.stack(
            [render(source.image, g, extract_size) for g in geometry])
    return Views(pixels, extract, geometry, source.data, source.ext)
