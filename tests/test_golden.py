"""A fixed job writes byte-identical shards, codebook and manifest: the guard for refactors that must not change
behaviour (issue: "no behaviour change, proven by byte-identical outputs").

CIFAR-sized input (600 generated 32 x 32 images in 10 classes, stored as PPM so no image encoder's version enters
the bytes), pixel extractor, local runner, the exact k-means fit (``fit_exact``: backend-independent, so the bytes
are the same on every machine, and the same as before the fast fit existed; the default fast fit depends on the
backend). The parquet indexes are left out: pyarrow writes its version into them.
If an intended change alters the outputs, rerun with ``KMIM_GOLDEN_PRINT=1`` and paste the printed digests.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from conftest import class_image, job_overrides
from PIL import Image

from kmim.config import load_config
from kmim.pipeline.job import run_job

EXPECTED = {
    "codebook.safetensors": "fea115c54f274ed90888c281bc3fb169e91f8d9d15e457ad90c813901f9909c9",
    "manifest.json": "a6f29e616d19ca8e59bbcbdd53dae2552905634283714dd20b98771e6e68ebbb",
    "shard-00000.tar": "ca830d01a0d0a2be4ed5deeeb9a2f1478876c65d12f4d69f2fcad9032c70adf2",
    "shard-00001.tar": "15637f86b52b2114c00a91bf6c8edc1ad0b6e9698a1da58114246e7c1909381d",
    "shard-00002.tar": "a814e0640bac23e88a4491b746af8dd2cd92e4a7a772da84acaa2dd5d2c5ce3e",
}


def make_cifar_like(root: Path) -> Path:
    rng = np.random.default_rng(1234)
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True)
        for j in range(60):
            img = class_image(rng, c, (32, 32))
            img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 12 * c - 60, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{c}" / f"{j:03d}.ppm")
    return root


def test_a_fixed_job_writes_the_same_bytes(tmp_path: Path) -> None:
    images = make_cifar_like(tmp_path / "images")
    out = tmp_path / "out"
    run_job(load_config(None, job_overrides(out=str(out), input=str(images), image_size=32, patch_size=4, k=64,
                                            shard_size=200, kmeans_epochs=5, kmeans_batch_size=1024,
                                            fit_patches=20_000, fit_exact=True)))
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
           if p.suffix in (".tar", ".safetensors", ".json") and p.name != "job.json"}
    if os.environ.get("KMIM_GOLDEN_PRINT"):
        print("EXPECTED = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in got.items()) + "}")
    assert got == EXPECTED
