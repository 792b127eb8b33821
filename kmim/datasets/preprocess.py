"""Image decoding and the views the tokens are computed on.

This module is the contract between the writer (tokenize stage) and the reader (training loader): both decode
the stored image bytes with :func:`decode_source` and draw a view with :func:`render` from its recorded geometry
(:func:`decode_view` for the center view, :func:`decode_views` for all of an image's views), so a token grid
always matches the exact pixels the trainer sees. Two render methods exist (``Preprocess.render``): ``full``
(every image decoded whole, as kmim always did) and ``scaled`` (JPEGs decoded at a reduced DCT scale where a view
allows it, see :func:`render`); a dataset records its method in its preprocessing description.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from kmim.datasets.geometry import ViewSpec, center_geometry, view_box, view_geometries
from kmim.datasets.orientation import STORED_AXES, exif_orientation, stored_box
from kmim.datasets.png import decode_plain_png, plain_png_size
from kmim.datasets.resample import resample_box

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


# Render methods: FULL decodes every image whole (the pixels of every dataset written before the method was
# recorded); SCALED decodes a JPEG at a reduced DCT scale where the view allows it (:func:`render`).
FULL = "full"
SCALED = "scaled"
RENDERS = (FULL, SCALED)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``image_size`` (bicubic), then center-crop ``image_size`` x ``image_size``;
    ``render`` is the render method (:data:`RENDERS`, see :func:`render`)."""

    image_size: int
    min_image_size: int = 8
    max_image_pixels: int = 89_478_485
    render: str = FULL

    def __post_init__(self) -> None:
        if self.render not in RENDERS:
            raise ValueError(f"render method {self.render!r} is not one of {RENDERS}")

    @classmethod
    def from_description(cls, desc: dict) -> Preprocess:
        """The preprocessing a :meth:`describe` dict (e.g. a manifest's ``preprocess``) states; a description
        without ``render`` is the full method. Raises KeyError / TypeError when a field is missing, ValueError
        for an unknown render method; the caller compares ``describe()`` with ``desc`` for the rest."""
        return cls(desc["image_size"], desc["min_image_size"], desc["max_image_pixels"], desc.get("render", FULL))

    def describe(self) -> dict:
        # The full method is not named, so descriptions (manifests, fit caches) written before it stay equal.
        method = {} if self.render == FULL else {"render": self.render}
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
            **method,
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


def _check_size(width: int, height: int, pre: Preprocess) -> None:
    if min(width, height) < pre.min_image_size:
        raise SkipImage(TOO_SMALL, f"{width}x{height} < {pre.min_image_size}")


def _opened(data: bytes, pre: Preprocess) -> Image.Image:
    """``data`` opened by Pillow: its header parsed, no pixels decoded."""
    with _pillow_pixel_limit(pre.max_image_pixels):
        return Image.open(io.BytesIO(data), formats=_FORMATS)


def _oriented_rgb(data: bytes, pre: Preprocess, img: Image.Image | None = None) -> tuple[Image.Image, str]:
    """(the EXIF-oriented RGB image, Pillow's format name) of image bytes (``img``: them already
    :func:`_opened`); raises :class:`SkipImage`."""
    img = _opened(data, pre) if img is None else img
    with _pillow_pixel_limit(pre.max_image_pixels):
        fmt = img.format or ""
        _check_pixels(img, pre)
        img.load()
        _check_pixels(img, pre)  # a frame may be larger than the header said (ICO)
        img = ImageOps.exif_transpose(img)
    _check_size(*img.size, pre)
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


def jpeg_scale(box: tuple[float, ...], size: int) -> int:
    """M of the DCT scale M/8 the scaled method decodes a JPEG at to render the view of source ``box`` (px) at
    ``size`` px: the smallest M in 1..8 that keeps at least ``size`` pixels on each side of the box."""
    return min(8, math.ceil(8 * size / min(box[2] - box[0], box[3] - box[1])))


@dataclass(eq=False)
class JpegSource:
    """A JPEG the scaled method decodes per view (:func:`render`): ``size`` [width, height] of the oriented image
    and ``stored`` as the file stores it (px), ``orientation`` the EXIF transpose (None: none). Decodes are kept,
    by scale, for the next view; not for sharing between threads."""

    data: bytes
    pre: Preprocess
    size: tuple[int, int]
    stored: tuple[int, int]
    orientation: Image.Transpose | None
    _full: Image.Image | None = field(default=None, repr=False)
    _reduced: dict[int, np.ndarray | None] = field(default_factory=dict, repr=False)

    def full(self) -> Image.Image:
        """The oriented RGB image, decoded whole as the full method decodes it; raises :class:`SkipImage`."""
        if self._full is None:
            with _as_skip():
                self._full = _oriented_rgb(self.data, self.pre)[0]
        return self._full

    def reduced(self, m: int) -> np.ndarray | None:
        """The stored image decoded by libjpeg-turbo at DCT scale ``m``/8: uint8 [ceil(``m``/8 x height),
        ceil(``m``/8 x width), 3] (RGB); None when that decode fails (a truncated or corrupt file, a chroma sampling
        it does not take)."""
        if m not in self._reduced:
            (w, h), pixels = self.stored, None
            shape = ((h * m + 7) // 8, (w * m + 7) // 8, 3)
            with contextlib.suppress(Exception):  # hostile bytes raise anything; the full path then decides
                pixels = simplejpeg.decode_jpeg(self.data, "RGB", min_height=shape[0], min_width=shape[1])
            ok = pixels is not None and pixels.shape == shape
            self._reduced[m] = pixels if ok else None
        return self._reduced[m]

    def render(self, geometry: dict, size: int) -> np.ndarray:
        """:func:`render` of this JPEG: uint8 [size, size, 3]."""
        box = view_box(geometry)
        m = jpeg_scale(box, size)
        reduced = self.reduced(m) if m < 8 else None
        if reduced is None:
            return _render_full(self.full(), geometry, size)
        view = resample_box(reduced, tuple(c * m / 8 for c in stored_box(box, self.orientation, *self.stored)), size)
        if self.orientation is not None:
            view = np.asarray(Image.fromarray(view).transpose(self.orientation))
        return _mirrored(view, geometry["flip"])


def _jpeg_source(data: bytes, pre: Preprocess, img: Image.Image) -> JpegSource | None:
    """``data`` (``img``: them :func:`_opened`) as a :class:`JpegSource` when it is a JPEG the scaled method decodes
    reduced (Pillow format JPEG, mode RGB or L), after the checks of the full path that need no pixels (pixel
    limit, EXIF orientation, minimum size); None for any other image. Raises :class:`SkipImage` as the full path
    does."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    _check_pixels(img, pre)
    orientation = exif_orientation(img)
    w, h = img.size
    size = (h, w) if STORED_AXES[orientation][0] else (w, h)
    _check_size(*size, pre)
    return JpegSource(data, pre, size, (w, h), orientation)


@dataclass(frozen=True)
class Source:
    """A decoded source image: ``image`` the EXIF-oriented RGB image, or with the scaled method a
    :class:`JpegSource` decoded per view; ``data`` and ``ext`` the image as a shard stores it (the input bytes when
    their format has an extension in IMAGE_EXTS, else a PNG of ``image``)."""

    image: Image.Image | JpegSource
    data: bytes
    ext: str


def decode_source(data: bytes, pre: Preprocess) -> Source:
    """Decode image bytes once (with the scaled method, a JPEG's header only: its pixels are decoded by
    :func:`render`); raises :class:`SkipImage` for bad input. Thread-safe; PIL and libjpeg-turbo release the GIL
    while they decode and resize, so threads decode in parallel."""
    if not data:
        raise SkipImage(EMPTY)
    with _as_skip():
        size = plain_png_size(data)
        if size is not None and size[0] * size[1] <= pre.max_image_pixels and min(size) >= pre.min_image_size:
            pixels = decode_plain_png(data, size)
            if pixels is not None:
                return Source(Image.fromarray(pixels), data, "png")
        img = _opened(data, pre)  # once: the scaled method's JPEG check and the full decode share it
        jpeg = _jpeg_source(data, pre, img) if pre.render == SCALED else None
        if jpeg is not None:
            return Source(jpeg, data, "jpg")
        img, fmt = _oriented_rgb(data, pre, img)
        ext = FORMAT_EXT.get(fmt)
        if ext is None:  # a format the reader side does not list: store a PNG of exactly these pixels
            buf = io.BytesIO()
            img.save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    return Source(img, data, ext)


def render(image: Image.Image | JpegSource, geometry: dict, size: int) -> np.ndarray:
    """The view ``geometry`` of a decoded source image (:attr:`Source.image`) at ``size`` px: uint8 [size, size, 3].

    Full method (an oriented RGB image): the center view at its own size is resized (bicubic) then cropped; any
    other view or size resamples its box of source pixels (:func:`view_box`) straight to ``size`` x ``size``
    (bicubic); then a flipped view is mirrored left-right.

    Scaled method (a :class:`JpegSource`): with M = :func:`jpeg_scale` of the view's box, i.e. the smallest M in
    1..8 with M/8 x the box's shorter side >= ``size``, a view with M <= 7 (a box at least 8/7 x ``size`` px on its
    shorter side) is rendered from the JPEG decoded by libjpeg-turbo in the DCT domain at scale M/8: the box, mapped
    into the stored (not yet EXIF-oriented) image and scaled by M/8, is resampled straight to ``size`` x ``size``
    (:func:`kmim.datasets.resample.resample_box`), then oriented, then mirrored if flipped. The last resample never
    enlarges, and shrinks the box's shorter side by less than M/(M-1) for M >= 2: by less than 5/4 for M >= 5, e.g.
    every reduced view of an ImageNet-sized photograph at 224 px. A box shrunk by at most 5/4 on both sides is
    resampled bilinearly without antialiasing (the reduced decode is already low-passed to its own pixel grid, and
    such a shrink folds back at most the top fifth of that band), any other by Pillow's antialiased bicubic. Its
    pixels differ from the full method's, so the method is recorded. Every other view (M = 8), every image that is
    not a JPEG in mode RGB or L (Pillow's format JPEG, so not MPO; not CMYK) and every JPEG whose reduced decode
    fails (it is strict: recoverable corruption fails it too) is rendered from the whole decode exactly as the full
    method renders it, bit for bit."""
    if isinstance(image, JpegSource):
        return image.render(geometry, size)
    return _render_full(image, geometry, size)


def _render_full(image: Image.Image, geometry: dict, size: int) -> np.ndarray:
    """The full method's :func:`render` of the oriented RGB ``image``: uint8 [size, size, 3]."""
    if "source_box" not in geometry:
        (w, h), (nw, nh), (left, top, right, bottom) = (geometry["source_size"], geometry["resized"],
                                                        geometry["crop_box"])
        if right - left == size:
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            return np.asarray(image.crop((left, top, right, bottom)), dtype=np.uint8)
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=view_box(geometry)), dtype=np.uint8)
    return _mirrored(pixels, geometry["flip"])


def _mirrored(pixels: np.ndarray, flip: bool) -> np.ndarray:
    """``pixels`` [S, S, 3] mirrored left-right when ``flip``."""
    return np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels


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
