"""Patch features recomputed the way the tokenizer computed them, to rank a code's patches by distance to its
centroid.

The pixel extractor is rebuilt from the codebook's metadata alone. A learned one (dino, clip) needs its weights:
the file given, or the one the local caches hold (never downloaded); it is used only when the extractor it builds
records the same metadata as the codebook (weights sha256, layer, grid, normalization...), except the weights
file's name and the autocast dtype (the report runs in float32). Otherwise :func:`recompute` says why not, and the
gallery falls back to a deterministic sample of the patches carrying each code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from kmim.tokenizers.extractors import Extractor, PixelSpec, build_extractor
from kmim.tokenizers.learned import LearnedSpec


@dataclass(frozen=True)
class Recomputed:
    """The extractor rebuilt from a codebook (None: features cannot be recomputed) and a sentence saying which
    it is, or why there is none."""

    extractor: Extractor | None
    note: str


def _spec(meta: dict, weights: str | None, extract_size: int, grid: int) -> PixelSpec | LearnedSpec:
    """The extractor settings codebook metadata ``meta`` records (KeyError when a field is missing)."""
    if meta["extractor"] == "pixel":
        return PixelSpec(meta["patch_size"], meta["normalize"], meta["norm_pix"])
    resample = meta["feature_resample"]
    # "none": the model's grid is the token grid, which resample "input" builds.
    return LearnedSpec(meta["extractor"], meta["model"], json.dumps(meta["model_kwargs"], sort_keys=True), weights,
                       meta["layer"], meta["normalize"], "input" if resample == "none" else resample, "fp32", "auto",
                       extract_size, extract_size // grid)


def recompute(meta: dict, weights: str | None, extract_size: int, grid: int) -> Recomputed:
    """The extractor of codebook metadata ``meta`` that sees ``extract_size`` px views and yields a ``grid`` x
    ``grid`` feature map; learned extractors load ``weights`` (None: the local caches)."""
    name = meta.get("extractor")
    try:
        extractor = build_extractor(_spec(meta, weights, extract_size, grid))
    except KeyError as e:
        return Recomputed(None, f"the codebook metadata has no field {e} to rebuild the {name} extractor")
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # no weights, weights not loadable, no such model
        return Recomputed(None, f"the {name} extractor cannot be rebuilt here ({type(e).__name__}: {e})")
    built = extractor.metadata()
    # The weights' content decides, not their file name; the digest first, as the likeliest difference.
    keys = sorted(set(built) - {"dtype", "weights_file"}, key=lambda key: key != "weights_digest")
    differs = [key for key in keys if meta.get(key) != built[key]]
    if differs:
        key = differs[0]
        return Recomputed(None, f"the {name} extractor built here differs from the codebook's in '{key}' "
                                f"({built[key]!r}, codebook {meta.get(key)!r})")
    return Recomputed(extractor, f"features recomputed with the {name} extractor, as the tokenizer computed them")


def distances(extractor: Extractor, centroids: torch.Tensor, metric: str, views: np.ndarray,
              tokens: np.ndarray) -> np.ndarray:
    """Each patch's distance to the centroid of its stored token: float64 [B, h, w] for ``views`` uint8
    [B, N, N, 3] and ``tokens`` int64 [B, h, w]. ``metric`` "l2": squared Euclidean distance; "ip" (features
    L2-normalized, spherical k-means): 1 - cosine similarity."""
    images = torch.from_numpy(np.ascontiguousarray(views.transpose(0, 3, 1, 2)))
    with torch.inference_mode():
        feats = extractor(images).float().cpu()  # [B, h, w, D]
        own = centroids[torch.from_numpy(tokens)]  # [B, h, w, D]
        dist = 1.0 - (feats * own).sum(-1) if metric == "ip" else ((feats - own) ** 2).sum(-1)
    return dist.double().numpy()
