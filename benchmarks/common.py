"""Shared helpers for benchmarks: the CIFAR subset as pixel patches, and JSON-line output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from kmim.datasets.preprocess import Preprocess, decode_view
from kmim.tokenizers.extractors import PixelExtractor

CIFAR = Path(os.environ.get("KMIM_CIFAR", Path(__file__).resolve().parents[2] / "shared/data/cifar10-subset/train"))


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def emit(**result) -> None:
    print(json.dumps(result), flush=True)


def cifar_patches(image_size: int = 32, patch_size: int = 4) -> tuple[torch.Tensor, int]:
    """Pixel patch features [N, p*p*3] of every CIFAR-subset image (ImageNet-normalized) and the image count."""
    if not CIFAR.is_dir():
        raise SystemExit(f"CIFAR subset not found at {CIFAR} (set KMIM_CIFAR)")
    files = sorted(p for p in CIFAR.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    pre = Preprocess(image_size)
    pixels = np.stack([decode_view(p.read_bytes(), pre).pixels for p in files])
    feats = PixelExtractor(patch_size)(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    return feats.reshape(-1, feats.shape[-1]).contiguous(), len(files)
