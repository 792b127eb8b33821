"""Plain PNGs decode through OpenCV to exactly Pillow's pixels; every other PNG, and every damaged one, takes the
Pillow path, so what is skipped (and why) does not change."""

from __future__ import annotations

import io
import random
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from skimage import data as photos

from kmim.datasets.png import plain_png_size
from kmim.datasets.preprocess import Preprocess, SkipImage, decode_source, decode_view

PRE = Preprocess(image_size=32, min_image_size=8, max_image_pixels=400_000)


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def plain_pngs() -> list[bytes]:
    rng = np.random.default_rng(0)
    astronaut, camera = Image.fromarray(photos.astronaut()), Image.fromarray(photos.camera())
    return [
        png(astronaut.resize((96, 64))),
        png(astronaut.resize((33, 17)), optimize=True),
        png(camera.resize((40, 50))),  # gray
        png(Image.fromarray(rng.integers(0, 256, (29, 31, 3), dtype=np.uint8)), dpi=(72, 72)),  # with pHYs
        png(Image.fromarray(rng.integers(0, 256, (12, 64), dtype=np.uint8)), compress_level=0),
        cv2.imencode(".png", np.asarray(astronaut.resize((48, 48)))[:, :, ::-1])[1].tobytes(),  # OpenCV's writer
    ]


@pytest.mark.parametrize("index", range(6))
def test_plain_pngs_decode_to_pillows_pixels(index: int) -> None:
    data = plain_pngs()[index]
    assert plain_png_size(data) == Image.open(io.BytesIO(data)).size
    source = decode_source(data, PRE)
    assert source.ext == "png" and source.data == data
    assert np.array_equal(np.asarray(source.image), pillow_rgb(data))


def xmp_orientation(value: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
                                       f'1999/02/22-rdf-syntax-ns#"><rdf:Description tiff:Orientation="{value}" '
                                       f'xmlns:tiff="http://ns.adobe.com/tiff/1.0/"/></rdf:RDF></x:xmpmeta>',
                  zip=True)
    return info


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_other_pngs_take_the_pillow_path() -> None:
    wide = Image.fromarray(np.full((20, 40, 3), 90, np.uint8))  # W=40, H=20
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "hello")
    others = {
        "RGBA": png(wide.convert("RGBA")), "LA": png(wide.convert("LA")), "P": png(wide.convert("P")),
        "RGB with tRNS": png(wide, transparency=(90, 90, 90)), "16 bit": png(Image.new("I;16", (40, 20), 7)),
        "text": png(wide, pnginfo=text), "eXIf": png(wide, exif=exif_orientation(6)),
        "XMP orientation": png(wide, pnginfo=xmp_orientation(6)), "bytes after IEND": png(wide) + b"\0",
    }
    for name, data in others.items():
        assert plain_png_size(data) is None, name
    assert (decode_view(others["RGBA"], PRE).pixels == 90).all()  # opaque
    assert (decode_view(others["RGB with tRNS"], PRE).pixels == 90).all()  # as before: Pillow's RGB ignores the key
    for name in ("eXIf", "XMP orientation"):  # both rotate the image upright
        assert decode_view(others[name], PRE).geometry["source_size"] == [20, 40], name
    assert decode_view(others["text"], PRE).geometry["source_size"] == [40, 20]


def with_fixed_crcs(data: bytearray) -> bytes:
    """``data`` (a PNG) with every whole chunk's CRC recomputed: damage reaches the image data, not the chunk layer."""
    pos = 8
    while pos + 12 <= len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        end = pos + 12 + length
        if end > len(data):
            break
        data[end - 4:end] = zlib.crc32(data[pos + 4:end - 4]).to_bytes(4, "big")
        pos = end
    return bytes(data)


def outcome(data: bytes) -> np.ndarray | str:
    """What decode_source makes of ``data``: its RGB pixels, or the reason it is skipped."""
    try:
        return np.asarray(decode_source(data, PRE).image)
    except SkipImage as e:
        return e.reason


def outcomes_as_on_the_pillow_path(cases: list[bytes], monkeypatch) -> list[np.ndarray | str]:
    """The outcome of each case, asserted equal to the one the Pillow path alone gives it."""
    got = [outcome(data) for data in cases]
    monkeypatch.setattr("kmim.datasets.preprocess.plain_png_size", lambda data: None)  # every PNG to Pillow
    for data, ours in zip(cases, got, strict=True):
        pillows = outcome(data)
        assert type(ours) is type(pillows) and np.array_equal(ours, pillows), (ours, pillows)
    return got


# Damaged headers can state sizes Pillow warns about before kmim skips them.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_damaged_plain_pngs_skip_exactly_when_and_why_the_pillow_path_does(monkeypatch) -> None:
    rng = random.Random(3)
    seeds = plain_pngs()
    damaged = []
    for i in range(450):
        data = bytearray(rng.choice(seeds))
        if i % 3 == 0:  # anywhere
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(8, len(data))] = rng.randrange(256)
        elif i % 3 == 1:  # the header's size, depth or colour type: more or less data than it says, or other pixels
            data[rng.choice([18, 19, 22, 23, 24, 25])] ^= 1 << rng.randrange(8)
        if rng.random() < 0.3:
            del data[rng.randrange(8, len(data)):]
        damaged.append(with_fixed_crcs(data) if rng.random() < 0.7 else bytes(data))
    plain = sum(plain_png_size(data) is not None for data in damaged)
    got = outcomes_as_on_the_pillow_path(damaged, monkeypatch)
    skipped = sum(isinstance(g, str) for g in got)
    assert plain > 100 and 100 < skipped < 400, (plain, skipped)


def with_chunk(data: bytes, tag: bytes, body: bytes, after_image: bool) -> bytes:
    """``data`` (a PNG) with a well-formed chunk inserted before its first IDAT, or (``after_image``) before IEND."""
    chunk = struct.pack(">I", len(body)) + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")
    at = data.index(b"IEND" if after_image else b"IDAT") - 4
    return data[:at] + chunk + data[at:]


@pytest.mark.parametrize(("tag", "length"), [(b"gAMA", 4), (b"cHRM", 32), (b"sRGB", 1), (b"pHYs", 9), (b"tIME", 7),
                                             (b"sBIT", 3)])
def test_colour_chunks_of_any_length_skip_or_decode_as_on_the_pillow_path(tag: bytes, length: int,
                                                                           monkeypatch) -> None:
    # Pillow refuses some chunks shorter than specified (an empty gAMA: "truncated") that libpng only warns about.
    seed = plain_pngs()[0]  # RGB
    assert plain_png_size(with_chunk(seed, tag, bytes(range(length)), after_image=False)) is not None
    cases = [with_chunk(seed, tag, bytes(range(n)), after) for n in sorted({0, 1, length - 1, length, length + 1})
             for after in (False, True)]
    outcomes_as_on_the_pillow_path(cases, monkeypatch)
