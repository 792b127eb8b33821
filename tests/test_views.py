"""Multi-view token grids (``kmim run --views V``): every stored view's tokens are those of the exact pixels the
loader renders for it, for the pixel extractor and a learned one (also rendered at another size), whatever the
runner, after a rerun and across a loader resume; ``verify`` checks each view's geometry."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import class_image, job_overrides, make_image_folder
from PIL import Image
from test_learned_extractors import VIT16, save_tiny

from kmim.config import ConfigError, load_config
from kmim.datasets.codebook import load_codebook
from kmim.datasets.geometry import random_geometry
from kmim.datasets.loader import TokenDataset, TokenLoader
from kmim.datasets.manifest import CODEBOOK, read_manifest
from kmim.datasets.preprocess import Preprocess, ViewSpec, decode_source, render
from kmim.datasets.shards import ShardWriter, iter_tar
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import run_job
from kmim.pipeline.specs import extractor_spec
from kmim.tokenizers.assign import nearest
from kmim.tokenizers.extractors import PixelExtractor, build_extractor

VIEWS = 4


def views_folder(root: Path) -> Path:
    """12 generated images plus extreme aspect ratios (200 x 20, 20 x 200, 90 x 9)."""
    make_image_folder(root, per_class=4)
    rng = np.random.default_rng(7)
    for c, size in enumerate([(200, 20), (20, 200), (90, 9)]):
        Image.fromarray(class_image(rng, c, size)).save(root / f"class_{c}" / f"wide_{c}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return views_folder(tmp_path_factory.mktemp("views") / "images")


def run(out: Path, folder: Path, **kw) -> dict:
    return run_job(load_config(None, job_overrides(out=str(out), input=str(folder), views=VIEWS, shard_size=6, **kw)))


def raw_dataset(out: Path) -> TokenDataset:
    """The loader with pixels in [0, 1] (no normalization), so ``image * 255`` rounds to the rendered uint8 view."""
    return TokenDataset(out, batch_size=3, rank=0, world_size=1, drop_last=False, mean=(0, 0, 0), std=(1, 1, 1))


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 [1, 3, S, S] of a loader image float32 [3, S, S] in [0, 1]."""
    return (image * 255).round().to(torch.uint8)[None]


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def test_view_geometry_is_a_pure_function_with_the_center_fallback() -> None:
    spec = ViewSpec(VIEWS, seed=3)
    assert random_geometry(640, 480, spec, "00ff", 2) == random_geometry(640, 480, spec, "00ff", 2)
    assert random_geometry(640, 480, spec, "00ff", 2) != random_geometry(640, 480, spec, "00ff", 3)
    # No crop of this aspect ratio range fits a 200 x 20 image: torchvision's fallback, a centered 27 x 20 crop.
    wide = random_geometry(200, 20, ViewSpec(VIEWS, scale=(0.9, 1.0)), "1", 1)
    assert wide["source_box"] == [86, 0, 113, 20]


def test_pixel_tokens_are_the_nearest_centroids_of_every_loader_view(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, folder)
    manifest = read_manifest(out)
    assert manifest["token_grid"]["shape"] == [VIEWS, 4, 4] and manifest["views"]["count"] == VIEWS
    assert manifest["samples"] == 15 and verify_dataset(out) == []
    book = load_codebook(out / CODEBOOK)
    extractor = PixelExtractor(8, "imagenet")
    ds = raw_dataset(out)
    flips = 0
    for index in range(manifest["samples"]):
        for view in range(VIEWS):
            got = ds.sample(index, view)
            feats = extractor(as_uint8(got["image"]))
            tokens, _ = nearest(feats.reshape(-1, feats.shape[-1]), book.centroids)
            assert torch.equal(tokens.reshape(4, 4), got["tokens"]), (index, view)
            flips += got["view"]["flip"]
    assert 0 < flips < manifest["samples"] * (VIEWS - 1)
    # Training batches show one random view each, exactly the one sample() renders.
    for batch in ds.batches(0):
        for i, (index, view) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist(), strict=True)):
            want = ds.sample(index, view)
            assert torch.equal(batch["image"][i], want["image"]) and torch.equal(batch["tokens"][i], want["tokens"])
    assert len(set(torch.cat([b["view"] for b in ds.batches(0)]).tolist())) > 1


@pytest.mark.parametrize("tokenizer_size", [None, 64])
def test_learned_tokens_match_the_rendered_views(folder: Path, tmp_path: Path, tokenizer_size: int | None) -> None:
    weights = save_tiny(tmp_path / "vit.safetensors", VIT16)
    extractor, model, kwargs = VIT16
    out = tmp_path / "out"
    settings = {"extractor": extractor, "model": model, "model_kwargs": json.dumps(kwargs), "weights": str(weights),
                "dtype": "fp32", "device": "cpu", "batch_size": 1, "k": 6, "tokenizer_image_size": tokenizer_size}
    run(out, folder, **settings)
    manifest = read_manifest(out)
    assert manifest.get("tokenizer_image_size") == tokenizer_size and manifest["preprocess"]["image_size"] == 32
    cfg = load_config(None, job_overrides(out=str(out), input=str(folder), views=VIEWS, **settings))
    ex = build_extractor(extractor_spec(cfg))
    book = load_codebook(out / CODEBOOK)
    ds = raw_dataset(out)
    for index in range(manifest["samples"]):
        got = [ds.sample(index, v) for v in range(VIEWS)]
        if tokenizer_size is None:  # the loader's own pixels
            images = torch.cat([as_uint8(g["image"]) for g in got])
        else:  # the loader's renderer, same geometry, at the tokenizer's size
            shard, pos = divmod(index, 6)
            with open(out / f"shard-{shard:05d}.tar", "rb") as f:
                sample = list(iter_tar(f, "shard"))[pos]
            source = decode_source(sample[next(e for e in ("png", "jpg") if e in sample)],
                                   Preprocess(32, render=manifest["preprocess"]["render"]))
            images = torch.from_numpy(np.stack([render(source.image, g["view"], tokenizer_size) for g in got]))
            images = images.permute(0, 3, 1, 2)
        with torch.inference_mode():
            feats = ex(images)
        tokens, _ = nearest(feats.reshape(-1, feats.shape[-1]), book.centroids, metric=ex.metric)
        assert torch.equal(tokens.reshape(VIEWS, 4, 4), torch.stack([g["tokens"] for g in got])), index


def test_runners_and_reruns_store_the_same_views(folder: Path, tmp_path: Path, ray_local) -> None:
    run(tmp_path / "local", folder)
    run(tmp_path / "ray", folder, runner="ray")
    run(tmp_path / "again", folder, decode_threads=3, batch_size=5)
    assert shard_digests(tmp_path / "local") == shard_digests(tmp_path / "ray") == shard_digests(tmp_path / "again")
    assert read_manifest(tmp_path / "local") == read_manifest(tmp_path / "ray")


def test_resume_with_random_views_equals_an_uninterrupted_run(folder: Path, tmp_path: Path) -> None:
    run(tmp_path / "out", folder)

    def make() -> TokenLoader:
        return TokenLoader(TokenDataset(tmp_path / "out", batch_size=2, rank=1, world_size=2, drop_last=False,
                                        shuffle_window=5))

    reference = list(make())
    first = make()
    head = [b for _, b in zip(range(2), first, strict=False)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(head + list(resumed), reference, strict=True):
        assert got["key"] == want["key"] and torch.equal(got["view"], want["view"])
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["tokens"], want["tokens"])
    assert torch.cat([b["view"] for b in reference]).any()


def test_verify_rejects_a_tampered_view_geometry(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, folder)
    shard = out / "shard-00001.tar"
    with open(shard, "rb") as f:
        samples = list(iter_tar(f, str(shard)))
    meta = json.loads(samples[2]["json"])
    width = meta["view"][1]["source_size"][0]
    meta["view"][1]["source_box"][2] = width + 5  # past the source's right edge
    samples[2]["json"] = json.dumps(meta, sort_keys=True).encode()
    writer = ShardWriter(shard)
    for s in samples:
        writer.write(s)
    writer.finish()
    writer.commit()
    assert any("view 1" in p and "crop box" in p for p in verify_dataset(out))


def test_view_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="tokenizer_image_size"):
        load_config(None, {"out": "x", "tokenizer_image_size": 64})
    with pytest.raises(ConfigError, match="view_scale"):
        load_config(None, {"out": "x", "view_scale": "0.5,0.2"})
    assert load_config(None, {"out": "x", "view_ratio": "0.5,2"}).view_ratio == (0.5, 2.0)
