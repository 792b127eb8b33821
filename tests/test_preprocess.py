"""Image decoding: every mode converts to RGB, every kind of bad input is skipped with its reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kmim.datasets.preprocess import (
    BOMB,
    EMPTY,
    TOO_SMALL,
    TRUNCATED,
    UNDECODABLE,
    Preprocess,
    SkipImage,
    decode_view,
)

PRE = Preprocess(image_size=32, min_image_size=8, max_image_pixels=200_000)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_geometry_resize_shorter_side_then_center_crop() -> None:
    arr = np.zeros((40, 80, 3), np.uint8)  # H=40, W=80
    arr[:, 40:] = 255  # right half white
    view = decode_view(encode(Image.fromarray(arr)), PRE)
    assert view.pixels.shape == (32, 32, 3) and view.pixels.dtype == np.uint8
    assert view.geometry == {"source_size": [80, 40], "resized": [64, 32], "crop_box": [16, 0, 48, 32], "flip": False}
    assert view.ext == "png"
    assert view.pixels[:, :14].max() < 10 and view.pixels[:, 18:].min() > 245  # the edge stays centered


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_modes_convert_to_rgb(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    view = decode_view(encode(img, fmt), PRE)
    assert view.pixels.shape == (32, 32, 3)


def test_sixteen_bit_scales_to_eight_bit() -> None:
    img = Image.fromarray(np.full((32, 32), 65535, np.uint16))
    view = decode_view(encode(img), PRE)
    assert (view.pixels == 255).all()


def test_transparent_pixels_composite_on_white() -> None:
    arr = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    view = decode_view(encode(Image.fromarray(arr, "RGBA")), PRE)
    assert (view.pixels == 255).all()


def test_exif_orientation_is_applied() -> None:
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # W=40, H=20
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    view = decode_view(encode(img, "JPEG", exif=exif), PRE)
    assert view.geometry["source_size"] == [20, 40]


def good_png() -> bytes:
    return encode(Image.fromarray(np.full((40, 40, 3), 128, np.uint8)))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", EMPTY),
    (b"definitely not an image", UNDECODABLE),
    (good_png()[:60], TRUNCATED),
    (encode(Image.new("L", (600, 600))), BOMB),
    (encode(Image.new("RGB", (4, 30))), TOO_SMALL),
])
def test_bad_inputs_are_skipped_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(SkipImage) as e:
        decode_view(data, PRE)
    assert e.value.reason == reason


def test_truncated_jpeg_is_skipped() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(SkipImage) as e:
        decode_view(data[: len(data) // 2], PRE)
    assert e.value.reason in (TRUNCATED, UNDECODABLE)
