"""Learned patch-feature extractors (K-MIM DINO, k-CLIP): a pretrained backbone cut at one layer and
aligned to the trainer's patch grid, ``grid = image_size // patch_size``.

Grid alignment (``resample``): with ``input`` (default) the stored view is resized (bicubic, antialiased)
to ``model_stride * grid`` pixels, so each model patch covers exactly one trainer patch; with ``bilinear``
or ``area`` the model runs at its own input size and its feature map is resampled to the grid. The codebook
metadata records which, plus the weights file's sha256, so a codebook never pairs with other weights.

Weights are never downloaded: see :mod:`kmim.tokenizers.weights`. Architectures are the library's own
(timm for ``dino``, open_clip for ``clip``), built with random initialization and then loaded; ``model_kwargs``
override the architecture (timm: ``create_model`` keyword arguments; open_clip: merged into the model config).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from kmim.tokenizers.weights import file_sha256

_FAMILIES = {"dino": "kmim.tokenizers.dino", "clip": "kmim.tokenizers.clip"}


@dataclass(frozen=True)
class Backbone:
    """A model cut at one layer: normalized float images [B, 3, S, S] -> feature map [B, dim, S/stride, S/stride]."""

    module: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    stride: int  # input pixels per feature-map cell
    native_size: int  # the model's own input resolution
    dim: int
    layer: int  # non-negative index of the chosen block / stage
    layer_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: dict  # architecture description for the codebook metadata


def resolve_layer(layer: int | None, n: int, default: int, model: str, what: str) -> int:
    """Non-negative index of ``layer`` among ``n`` (negative counts from the end; None = ``default``)."""
    if layer is None:
        return default
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range for '{model}' with {n} {what} (use 0..{n - 1}, or negative "
                         "indices from the end)")
    return layer % n


def family(extractor: str) -> ModuleType:
    """The module building ``extractor``'s backbones: check_name, build, resolve, load."""
    return importlib.import_module(_FAMILIES[extractor])


def check_architecture(extractor: str, model: str, kwargs: dict, layer: int | None) -> None:
    """Build the model skeleton on the meta device (no memory, no weights) to validate kwargs and layer."""
    with torch.device("meta"):
        family(extractor).build(model, kwargs, None, layer, None)


@dataclass(frozen=True)
class LearnedSpec:
    """The settings that determine a learned extractor (hashable: the per-process cache key). Sizes are in
    pixels; ``layer`` None is the model's last."""

    extractor: str
    model: str
    model_kwargs: str  # canonical JSON
    weights: str | None
    layer: int | None
    normalize: str  # "none" | "l2"
    resample: str  # "input" | "bilinear" | "area"
    dtype: str  # "auto" | "fp32" | "bf16"
    device: str  # "auto" | "cpu" | "cuda[:N]"
    image_size: int
    patch_size: int


LOGICAL_GPUS_ENV = "KMIM_LOGICAL_GPUS"


def torch_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).

    ``cuda`` in a Ray GPU actor is the GPU Ray assigned it (Ray sets ``CUDA_VISIBLE_DEVICES``). Without CUDA a
    ``cuda`` setting fails loudly, unless ``KMIM_LOGICAL_GPUS=cpu`` is set: then it runs on the CPU, which is
    how tests and dry runs exercise the GPU topology with Ray's logical GPUs on CPU-only machines.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        if os.environ.get(LOGICAL_GPUS_ENV) == "cpu":
            return torch.device("cpu")
        raise ValueError(f"field 'device': {name} requested but CUDA is not available on this machine "
                         f"(host {socket.gethostname()})")
    return torch.device(name)


class LearnedExtractor:
    """uint8 images [B, 3, image_size, image_size] -> float32 features [B, grid, grid, dim] on :attr:`device`
    (the nearest-centroid search then runs there too).

    Runs on ``device`` (CUDA when available by default) under bf16 autocast when ``dtype`` resolves to bf16
    (the default on CUDA; fp32 on CPU).
    """

    def __init__(self, spec: LearnedSpec):
        fam = family(spec.extractor)
        path, tag = fam.resolve(spec.model, spec.weights)
        kwargs = json.loads(spec.model_kwargs)
        self.grid = spec.image_size // spec.patch_size
        self.image_size = spec.image_size
        with torch.device("meta"):
            probe = fam.build(spec.model, kwargs, tag, spec.layer, None)
        self.input_size = probe.stride * self.grid if spec.resample == "input" else probe.native_size
        self.backbone = fam.build(spec.model, kwargs, tag, spec.layer, self.input_size)
        fam.load(self.backbone, path, spec.model)
        self.device = torch_device(spec.device)
        self.backbone.module.eval().requires_grad_(False).to(self.device)
        self.bf16 = spec.dtype == "bf16" or (spec.dtype == "auto" and self.device.type == "cuda")
        self.model_grid = self.input_size // self.backbone.stride
        self.resample = spec.resample
        self.l2 = spec.normalize == "l2"
        self.metric = "ip" if self.l2 else "l2"
        self.dim = self.backbone.dim
        self._mean = torch.tensor(self.backbone.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.backbone.std, device=self.device).view(1, 3, 1, 1)
        self._metadata = {
            "extractor": spec.extractor, "model": spec.model, "model_kwargs": kwargs, "arch": self.backbone.arch,
            "weights_file": Path(path).name, "weights_digest": file_sha256(path), "pretrained_tag": tag,
            "layer": self.backbone.layer, "layer_name": self.backbone.layer_name, "patch_size": spec.patch_size,
            "grid": [self.grid, self.grid], "input_size": self.input_size,
            "input_resize": "none" if self.input_size == self.image_size else "bicubic_antialias",
            "input_norm": {"mean": list(self.backbone.mean), "std": list(self.backbone.std)},
            "model_stride": self.backbone.stride, "model_grid": [self.model_grid, self.model_grid],
            "feature_resample": "none" if self.model_grid == self.grid else spec.resample,
            "normalize": spec.normalize, "dim": self.dim, "metric": self.metric,
            "dtype": "bf16" if self.bf16 else "fp32"}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected images [B, 3, {self.image_size}, {self.image_size}], got {list(images.shape)}")
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        x = images.to(self.device).float().div_(255.0)
        if self.input_size != self.image_size:
            # Clamped like a uint8 resize would be: bicubic overshoots.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)
        x = (x - self._mean) / self._std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats = self.backbone.forward(x)
        feats = feats.float()
        if self.model_grid != self.grid:
            size = (self.grid, self.grid)
            if self.resample == "area":
                feats = F.adaptive_avg_pool2d(feats, size)
            else:
                feats = F.interpolate(feats, size=size, mode="bilinear", align_corners=False,
                                      antialias=self.model_grid > self.grid)
        feats = feats.permute(0, 2, 3, 1)
        if self.l2:
            feats = F.normalize(feats, dim=-1)
        return feats.contiguous()

    def metadata(self) -> dict:
        return dict(self._metadata)


@lru_cache(maxsize=2)
def cached_extractor(spec: LearnedSpec) -> LearnedExtractor:
    """One extractor (model built and weights loaded once) per process and spec."""
    return LearnedExtractor(spec)
