"""Per-sample augmentation for the training loader that keeps the token grid aligned with the pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Augment:
    """Per-sample augmentation, drawn from ``np.random.default_rng([seed, epoch, slot])`` so it resumes exactly.

    ``brightness`` / ``contrast``: factors drawn uniformly from ``[1 - x, 1 + x]`` (0 = off), applied in that
    order to pixels in [0, 1] (contrast blends towards the image's mean luminance), then clipped to [0, 1].
    Colour jitter leaves the geometry alone, so the token grid still indexes the same patches.

    ``hflip`` (geometric, opt-in): with probability 0.5 mirror the image left-right *and* the token grid's
    columns. Positions stay exact (the view is a center crop whose width is a multiple of the patch size),
    but each patch keeps the token of its unmirrored content: a tokenizer run on the mirrored image could
    assign other tokens. Batches carry ``flip`` so the geometry travels with the tokens.
    """

    hflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Augment.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.hflip or self.brightness > 0 or self.contrast > 0

    def apply(self, pixels: np.ndarray, tokens: np.ndarray, rng: np.random.Generator,
              ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Augment pixels float32 [S, S, 3] in [0, 1] (modified in place) and their token grid [h, w].

        Returns (pixels, tokens, flipped)."""
        # Draw every variate whether or not it is used, so one option never shifts another's stream.
        u, f = rng.uniform(-1.0, 1.0, 2).astype(np.float32), rng.random()  # float32 factors keep float32 pixels
        if self.brightness:
            pixels *= 1.0 + self.brightness * u[0]
        if self.contrast:
            gray = (pixels @ _LUMA).mean()
            pixels = (pixels - gray) * (1.0 + self.contrast * u[1]) + gray
        pixels = np.clip(pixels, 0.0, 1.0)
        flip = self.hflip and f < 0.5
        if flip:
            pixels, tokens = pixels[:, ::-1], tokens[:, ::-1]
        return pixels, tokens, bool(flip)
