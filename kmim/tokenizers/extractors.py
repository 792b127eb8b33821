"""Patch-feature extractors: uint8 images [B, 3, H, W] -> features float32 [B, H/p, W/p, D].

Every extractor has the same call signature so the fit and tokenize stages never know which one runs.
Feature row-major order matches the image's patch grid (row ``i``, column ``j`` is the patch at pixel
rows ``i*p:(i+1)*p`` and columns ``j*p:(j+1)*p``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kmim.tokenizers.learned import LearnedSpec, cached_extractor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Extractor(Protocol):
    """What the pipeline needs from a feature extractor."""

    dim: int
    metric: str  # "l2" (Euclidean k-means) or "ip" (spherical k-means on L2-normalized features)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images uint8 [B, 3, H, W] -> float32 features [B, h, w, dim]."""
        ...

    def metadata(self) -> dict:
        """Everything that determines the features (goes into the codebook's tokenizer_id)."""
        ...


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/p, W/p, p*p*C] in MAE order (within a patch: row, column, channel)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h // p, w // p, p * p * c)


@dataclass
class PixelExtractor:
    """K-MIM PIXEL: the raw p*p*3 patch after the training normalization (768-d for p=16)."""

    patch_size: int
    normalize: str = "imagenet"
    norm_pix: bool = False
    metric: str = field(default="l2", init=False)

    @property
    def dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32, copy=True).div_(255.0)  # then in place: fresh batch-sized tensors cost more in
        # page faults than their arithmetic
        if self.normalize == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x.sub_(mean).div_(std)
        feats = patchify(x, self.patch_size)
        if self.norm_pix:
            mean = feats.mean(dim=-1, keepdim=True)
            var = feats.var(dim=-1, keepdim=True)
            feats = (feats - mean) / (var + 1.0e-6) ** 0.5
        return feats

    def metadata(self) -> dict:
        return {"extractor": "pixel", "weights_digest": None, "layer": None, "patch_size": self.patch_size,
                "normalize": self.normalize, "norm_pix": self.norm_pix, "dim": self.dim, "metric": self.metric}


@dataclass(frozen=True)
class PixelSpec:
    """The settings of a :class:`PixelExtractor`: ``patch_size`` in pixels, input ``normalize`` ("imagenet" |
    "none"), and ``norm_pix`` (per-patch mean/variance normalization)."""

    patch_size: int
    normalize: str
    norm_pix: bool


# What :func:`build_extractor` takes: the settings that determine an extractor's features.
ExtractorSpec = PixelSpec | LearnedSpec


def build_extractor(spec: ExtractorSpec) -> Extractor:
    """The extractor of ``spec``.

    Learned extractors (dino, clip) are built once per process and spec, then reused by every stage call.
    """
    if isinstance(spec, PixelSpec):
        return PixelExtractor(spec.patch_size, spec.normalize, spec.norm_pix)
    return cached_extractor(spec)
