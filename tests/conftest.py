"""Shared fixtures: generated image data and a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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

    from kmim.pipeline.runners import init_ray_on_loopback

    init_ray_on_loopback(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


def reset_ray_auth() -> None:
    """Make this process forget Ray's cached auth token and auth mode, so that the next node or driver it starts
    reads them from the environment again.

    Adapter around a private Ray API: ``ray._private.authentication_test_utils.reset_auth_token_state`` (a helper
    of Ray's own tests). This is the one place that calls it, imported here so that a Ray release without it
    breaks only the tests that reset auth; ``tests/test_private_apis.py`` says so when it happens.
    """
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


@contextmanager
def moto_s3(secret: str) -> Iterator[str]:
    """A real S3 endpoint (moto's server) on 127.0.0.1, random port; the AWS environment (inherited by
    subprocesses) points botocore at it, with ``secret`` as the secret access key."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                        "KMIM_LEASE_TTL_S"):
                mp.delenv(var, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", url)
            mp.setenv("AWS_ACCESS_KEY_ID", "kmim-test-key")
            mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            yield url
    finally:
        server.stop()


@pytest.fixture
def bucket(endpoint: str) -> Iterator[str]:
    """A fresh bucket on the module's ``endpoint`` fixture, as ``s3://name``; s3fs's cached filesystems are
    dropped around each test."""
    import boto3
    import s3fs

    name = f"kmim-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()
