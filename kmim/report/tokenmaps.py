"""Token maps: a view with its token grid drawn over it, one colour per token id."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import hsv_to_rgb

GOLDEN = 0.618033988749895
ALPHA = 0.5  # share of the token colour in an overlaid cell: enough to read the colour, the image stays visible


def palette(k: int) -> np.ndarray:
    """A colour per token id, uint8 [K, 3]: hues a golden-ratio step apart, so ids close in number differ in
    colour; saturation and value cycle too, so that far apart ids of similar hue still differ."""
    ids = np.arange(k)
    hsv = np.stack([(ids * GOLDEN) % 1.0, 0.55 + 0.4 * ((ids // 3) % 2), 0.95 - 0.3 * ((ids // 6) % 2)], axis=1)
    return np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8)


def hex_colour(rgb: np.ndarray) -> str:
    """``#rrggbb`` of a uint8 [3] colour."""
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def enlarged(pixels: np.ndarray, scale: int) -> np.ndarray:
    """``pixels`` uint8 [S, S, 3] enlarged ``scale`` times, nearest neighbour: [S * scale, S * scale, 3]."""
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def overlay(pixels: np.ndarray, tokens: np.ndarray, colours: np.ndarray, scale: int) -> np.ndarray:
    """``pixels`` uint8 [S, S, 3] enlarged ``scale`` times (nearest neighbour), each cell of the token grid
    ``tokens`` int [h, w] tinted with its token's colour (``colours`` uint8 [K, 3]), marked with it unblended in its
    top-left corner and outlined in black:
    uint8 [S * scale, S * scale, 3]."""
    big = enlarged(pixels, scale).astype(np.float32)
    cell = big.shape[0] // tokens.shape[0]
    tint = np.repeat(np.repeat(colours[tokens], cell, axis=0), cell, axis=1).astype(np.float32)
    out = np.round((1 - ALPHA) * big + ALPHA * tint).astype(np.uint8)
    tab = max(2, cell // 4)  # the token's own colour, unblended, in each cell's top-left corner: the legend's swatch
    for r, c in np.ndindex(*tokens.shape):
        out[r * cell:r * cell + tab, c * cell:c * cell + tab] = colours[tokens[r, c]]
    out[::cell, :] = 0
    out[:, ::cell] = 0
    out[-1, :] = 0
    out[:, -1] = 0
    return out


def legend(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(token id, cells) of the ids in grid ``tokens`` int [h, w], most frequent first, then by id."""
    ids, cells = np.unique(tokens, return_counts=True)
    order = np.lexsort((ids, -cells))
    return [(int(ids[i]), int(cells[i])) for i in order]
