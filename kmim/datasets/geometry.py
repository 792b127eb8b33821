"""View geometry: where each view of an image lies in its source pixels, as pure functions of the source size, the
view settings and (for random views) a seed and the sample key. Shards record these dicts per view; the tokenizer
and the loader render a view from one with :func:`kmim.datasets.preprocess.render`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


def crop_geometry(width: int, height: int, views: ViewSpec, rng: np.random.Generator) -> dict:
    """A random resized crop of a ``width`` x ``height`` source (``source_box`` in source pixels) and a flip flag
    drawn from ``rng`` (the flip first, then the crop)."""
    flip = bool(rng.random() < views.flip)
    return {"source_size": [width, height], "source_box": _crop_box(width, height, views, rng), "flip": flip}


def random_geometry(width: int, height: int, views: ViewSpec, key: str, view: int) -> dict:
    """View ``view`` >= 1 of the source with hex ``key``: :func:`crop_geometry`, a pure function of
    (``views.seed``, ``key``, ``view``)."""
    return crop_geometry(width, height, views, np.random.default_rng([views.seed, int(key, 16), view]))


def view_geometries(width: int, height: int, size: int, views: ViewSpec, key: str) -> list[dict]:
    """The geometry of each of the ``views.count`` views: the center view, then the random ones."""
    return [center_geometry(width, height, size)] + [random_geometry(width, height, views, key, v)
                                                       for v in range(1, views.count)]


def view_box(geometry: dict) -> tuple[float, float, float, float]:
    """[left, top, right, bottom] of the view ``geometry`` in source pixels (a center view's crop box, in resized
    pixels, scaled back)."""
    if "source_box" in geometry:
        return tuple(float(c) for c in geometry["source_box"])
    (w, h), (nw, nh), (left, top, right, bottom) = geometry["source_size"], geometry["resized"], geometry["crop_box"]
    return left * w / nw, top * h / nh, right * w / nw, bottom * h / nh


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
