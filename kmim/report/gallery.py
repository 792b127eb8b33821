"""The codebook gallery's patches: per code, the scanned patches carrying it with the lowest score, kept while
the scan streams.

The score of a patch is its distance to its code's centroid when features can be recomputed
(:mod:`kmim.report.features`), else a sampling priority drawn from the sample's key (:func:`priorities`), so the
patches shown are then a deterministic sample of those carrying the code, whatever order the scan met them in.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from kmim.files import atomic_write_bytes


def patches_of(pixels: np.ndarray, grid: int) -> np.ndarray:
    """The patches of views ``pixels`` uint8 [B, S, S, 3] on a ``grid`` x ``grid`` token grid: uint8
    [B, grid, grid, p, p, 3] with p = S / grid, patch (i, j) = pixel rows i*p:(i+1)*p, columns j*p:(j+1)*p."""
    b, s = pixels.shape[:2]
    p = s // grid
    return pixels.reshape(b, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)


def priorities(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Sampling priorities float64 [*shape] in [0, 1) of a sample's patches: a pure function of its key."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).random(shape)


class Nearest:
    """Per code, the ``per_code`` patches of lowest score among those added, ties in the order added; memory: at
    most K x ``per_code`` patches of ``patch`` x ``patch`` px.

    ``ref`` int64 [M, 4] locates each kept patch: (scanned image number, view, row, column).
    """

    def __init__(self, per_code: int, patch: int):
        self.per_code = per_code
        self.score = np.zeros(0, np.float64)
        self.token = np.zeros(0, np.int64)
        self.ref = np.zeros((0, 4), np.int64)
        self.patches = np.zeros((0, patch, patch, 3), np.uint8)

    def add(self, score: np.ndarray, token: np.ndarray, ref: np.ndarray, patches: np.ndarray) -> None:
        """Offer patches: ``score`` float64 [n], ``token`` int64 [n], ``ref`` int64 [n, 4], ``patches`` uint8
        [n, p, p, 3]; afterwards the kept ones are sorted by token, then score."""
        score = np.concatenate([self.score, score])
        token = np.concatenate([self.token, token])
        order = np.lexsort((score, token))  # stable: equal scores keep the order they were added in
        ranked = token[order]
        keep = order[np.arange(len(order)) - np.searchsorted(ranked, ranked, side="left") < self.per_code]
        self.score, self.token = score[keep], token[keep]
        self.ref = np.concatenate([self.ref, ref])[keep]
        self.patches = np.concatenate([self.patches, patches])[keep]

    def of(self, code: int) -> slice:
        """The kept patches of ``code``, best first, as a slice of :attr:`patches`, :attr:`ref`, :attr:`score`."""
        lo, hi = np.searchsorted(self.token, [code, code + 1])
        return slice(int(lo), int(hi))


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of ``pixels`` uint8 [H, W, 3]."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    return buf.getvalue()


def write_strip(path: Path, patches: np.ndarray) -> None:
    """One PNG of ``patches`` uint8 [n, p, p, 3] side by side, at their own resolution: [p, n * p, 3]."""
    atomic_write_bytes(path, png_bytes(np.concatenate(list(patches), axis=1)))
