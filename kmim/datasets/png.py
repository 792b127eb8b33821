"""Plain PNGs (8-bit RGB or gray, nothing that changes their pixels on the way to RGB) decoded by OpenCV's libpng.

PNG is lossless, so any conforming decoder gives Pillow's pixels; Pillow spends most of a small PNG's decode in its
Python chunk reader (67 us of a 32 px CIFAR image, OpenCV's decode 34 us). A PNG is plain when its chunks are well
formed (lengths and CRCs check out), the header says 8-bit RGB or gray, and every other chunk is image data or
colour metadata neither decoder applies, of its specified length; every other PNG (transparency, EXIF or XMP
orientation, text, animation, palettes, 16 bits), and any file OpenCV fails on, is left to the Pillow path, which
also names the reason a bad file is skipped. libpng prints a line to stderr for some damage it meets on the way.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The chunks a plain PNG may hold besides IHDR and IEND, with the data lengths the PNG specification gives them (None:
# any). A chunk of another length goes to Pillow, which refuses some that libpng only warns about (an empty gAMA).
_PLAIN_CHUNKS = {b"IDAT": None, b"sRGB": (1,), b"gAMA": (4,), b"cHRM": (32,), b"pHYs": (9,), b"sBIT": (1, 3),
                 b"tIME": (7,)}
_GRAY, _RGB = 0, 2  # IHDR colour types


def plain_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a plain PNG (see the module docstring), None for anything else."""
    if not data.startswith(SIGNATURE):
        return None
    view, pos, size = memoryview(data), len(SIGNATURE), None
    while pos + 12 <= len(data):
        length, tag = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return None
        if size is None:  # the first chunk
            if tag != b"IHDR" or length != 13:
                return None
            width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data,
                                                                                               pos + 8)
            if depth != 8 or colour not in (_GRAY, _RGB) or compression or filtering or interlace > 1:
                return None
            size = width, height
        elif tag == b"IEND":
            return size if end == len(data) else None
        elif tag not in _PLAIN_CHUNKS or _PLAIN_CHUNKS[tag] is not None and length not in _PLAIN_CHUNKS[tag]:
            return None
        pos = end
    return None


def decode_plain_png(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """uint8 [height, width, 3] RGB pixels of a plain PNG of header ``size`` (:func:`plain_png_size`), None where
    OpenCV cannot decode it (damaged image data) or decodes another size."""
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if pixels is None or pixels.shape[:2] != (size[1], size[0]) or pixels.dtype != np.uint8:
        return None
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB) if pixels.shape[2] == 3 else None
