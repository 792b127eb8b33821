"""Resampling a box of decoded pixels to a square view: bilinear by OpenCV's fixed-point remap for small shrinks
(integer weights and sums: the same pixels on every CPU), Pillow's antialiased bicubic otherwise."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

# Process-wide: kmim renders each image on one of its own threads (or processes), so OpenCV's pool would only
# oversubscribe them; no result depends on OpenCV's thread count.
cv2.setNumThreads(1)

# The largest shrink of a box side resampled bilinearly (:func:`resample_box`).
BILINEAR_SHRINK = 5 / 4


def resample_box(pixels: np.ndarray, box: tuple[float, ...], size: int) -> np.ndarray:
    """The ``box`` [left, top, right, bottom] (px, each side at least ``size`` px) of ``pixels`` uint8 [H, W, 3]
    resampled to uint8 [size, size, 3]: bilinearly when neither side shrinks by more than :data:`BILINEAR_SHRINK`
    (OpenCV's fixed-point remap: centers rounded to 1/32 px, integer weights and sums, so no CPU-dependent rounding),
    else by Pillow's antialiased bicubic."""
    if max(box[2] - box[0], box[3] - box[1]) > BILINEAR_SHRINK * size:
        return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=box))
    # The pixels the box reaches, and one more on each side: positions stay in the int16 range of OpenCV's maps.
    left, top = max(math.floor(box[0]) - 1, 0), max(math.floor(box[1]) - 1, 0)
    window = pixels[top:math.ceil(box[3]) + 2, left:math.ceil(box[2]) + 2]
    (x, x_fraction), (y, y_fraction) = (_fixed_centers(box[0] - left, box[2] - left, size),
                                        _fixed_centers(box[1] - top, box[3] - top, size))
    xy = np.empty((size, size, 2), np.int16)
    xy[:, :, 0], xy[:, :, 1] = x, y[:, None]
    fractions = y_fraction[:, None] * cv2.INTER_TAB_SIZE + x_fraction
    return cv2.remap(window, xy, fractions, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _fixed_centers(start: float, end: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the centers of ``size`` pixels spanning [``start``, ``end``) (px) fall among source pixels (pixel i
    centered at i), rounded to 1/32 px: (int16 [size] the source pixel at or before each, uint16 [size] the 32nds of a
    pixel beyond it)."""
    centers = start + (np.arange(size) + 0.5) * ((end - start) / size) - 0.5
    fixed = np.rint(centers * cv2.INTER_TAB_SIZE).astype(np.int32)
    return (fixed >> cv2.INTER_BITS).astype(np.int16), (fixed & cv2.INTER_TAB_SIZE - 1).astype(np.uint16)
