"""Shared fixtures: generated image data and a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def png_bytes(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, fmt)
    return buf.getvalue()


def class_image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> np.ndarray:
    """An RGB image [H, W, 3] whose colour and stripe direction depend on the class."""
    w, h = size
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label % 3], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = (np.sin((xx if label % 2 else yy) / 3.0) * 40)[..., None]
    img = base + stripes + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 12, classes: int = 3, seed: int = 0) -> Path:
    """ImageFolder tree root/class_i/img_j.{png,jpg} with varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            size = (int(rng.integers(32, 72)), int(rng.integers(32, 72)))
            arr = class_image(rng, c, size)
            if j % 2:
                Image.fromarray(arr).save(d / f"img_{j:03d}.jpg", quality=90)
            else:
                Image.fromarray(arr).save(d / f"img_{j:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def job_overrides(**kw) -> dict:
    """Small, fast job settings for tests."""
    base = {"image_size": 32, "patch_size": 8, "k": 8, "kmeans_epochs": 3, "kmeans_batch_size": 256,
            "shard_size": 10, "runner": "local", "batch_size": 16, "fit_patches": 2000}
    base.update(kw)
    return base


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
