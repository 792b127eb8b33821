"""Per-sample colour augmentation for the training loader; it keeps the token grid aligned with the pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Augment:
    """Per-sample colour augmentation, drawn from ``np.random.default_rng([seed, epoch, slot])`` so it resumes
    exactly.

    ``brightness`` / ``contrast``: factors drawn uniformly from ``[1 - x, 1 + x]`` (0 = off), applied in that
    order to pixels in [0, 1] (contrast blends towards the image's mean luminance), then clipped to [0, 1].
    Colour jitter leaves the geometry alone, so the token grid still indexes the same patches. Geometric
    augmentation (crops, flips) comes only from the stored views a dataset was tokenized with.
    """

    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Augment.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.brightness > 0 or self.contrast > 0

    def apply(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented pixels float32 [S, S, 3] in [0, 1] (``pixels`` is modified in place)."""
        # Draw every variate whether or not it is used, so one option never shifts another's stream.
        u = rng.uniform(-1.0, 1.0, 2).astype(np.float32)  # float32 factors keep float32 pixels
        if self.brightness:
            pixels *= 1.0 + self.brightness * u[0]
        if self.contrast:
            gray = (pixels @ _LUMA).mean()
            pixels = (pixels - gray) * (1.0 + self.contrast * u[1]) + gray
        return np.clip(pixels, 0.0, 1.0)
