"""Training loader: rank/worker balance, pure sample order, exact resume, refusals, and image/token alignment."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from conftest import job_overrides, make_image_folder

from kmim.config import load_config
from kmim.datasets.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    LoaderError,
    TokenDataset,
    TokenLoader,
)
from kmim.datasets.manifest import read_manifest
from kmim.datasets.order import epoch_order
from kmim.datasets.preprocess import Preprocess, decode_view
from kmim.datasets.shards import ShardWriter, decode_npy, iter_tar
from kmim.files import sha256_file
from kmim.pipeline.job import run_job

N = 27  # 3 classes x 9 images, in shards of 4: six of 4 and one of 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    make_image_folder(root / "images", per_class=9)
    run_job(load_config(None, job_overrides(out=str(root / "ds"), input=str(root / "images"), shard_size=4)))
    return root / "ds"


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "ds"))


def stored(root: Path) -> dict[str, dict]:
    """Every stored sample by key, read straight from the shard tars."""
    out = {}
    for entry in read_manifest(root)["shards"]:
        with open(root / entry["path"], "rb") as f:
            out.update({s["__key__"]: s for s in iter_tar(f)})
    return out


def indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def rewrite_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_counts_are_uneven(dataset: Path) -> None:
    assert [e["samples"] for e in read_manifest(dataset)["shards"]] == [4] * 6 + [3]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_equal_full_batches_and_disjoint_samples(dataset: Path, world: int, drop_last: bool,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    per_rank = []
    with caplog.at_level(logging.INFO, logger="kmim"):
        for rank in range(world):
            ds = TokenDataset(dataset, batch_size=4, rank=rank, world_size=world, drop_last=drop_last,
                              shuffle_window=6)
            batches = list(ds.batches(epoch=0))
            assert len(batches) == ds.batches_per_epoch and all(len(b["key"]) == 4 for b in batches)
            # Workers split the rank's batches round-robin; together they give the rank's sequence.
            by_worker = [list(ds.batches(0, worker=w, workers=2)) for w in range(2)]
            assert indices([by_worker[j % 2][j // 2] for j in range(len(batches))]) == indices(batches)
            per_rank.append(indices(batches))
    assert len({len(s) for s in per_rank}) == 1
    total = sum(len(s) for s in per_rank)
    order = epoch_order([4] * 6 + [3], 0, 0, window=6)
    together = [i for s in per_rank for i in s]
    if drop_last:
        assert total == 4 * world * (N // (4 * world)) and len(set(together)) == total
        assert together == order[:total].tolist()
        assert f"dropping {N - total} samples" in caplog.text
    else:
        assert total == 4 * world * -(-N // (4 * world)) and set(together) == set(range(N))
        assert together == np.resize(order, total).tolist()
        assert total == N or f"repeating {total - N} samples" in caplog.text


def test_dataloader_workers_yield_the_rank_sequence(dataset: Path) -> None:
    ds = TokenDataset(dataset, batch_size=4, rank=2, world_size=3, drop_last=False, shuffle_window=6)
    loader = TokenLoader(ds, num_workers=2)
    assert len(loader) == 3
    got = list(loader)
    assert indices(got) == ds.rank_sequence(0).tolist()
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["samples"] == 0


def test_order_is_a_pure_function_of_seed_epoch_and_world(dataset: Path) -> None:
    def seq(seed: int, epoch: int, rank: int = 0, world: int = 2) -> list[int]:
        ds = TokenDataset(dataset, batch_size=4, seed=seed, rank=rank, world_size=world, shuffle_window=6)
        return indices(list(ds.batches(epoch)))

    assert seq(0, 0) == seq(0, 0)
    assert seq(0, 0) != seq(0, 1) and seq(0, 0) != seq(1, 0) and seq(0, 0, world=3) != seq(0, 0)
    for epoch in range(3):
        order = epoch_order([4] * 6 + [3], 5, epoch, window=4)
        assert sorted(order.tolist()) == list(range(N))
        # Shards are visited as blocks: a window of 4 samples mixes at most 2 shards of 4.
        assert all(len(set((order[i:i + 4] // 4).tolist())) <= 2 for i in range(0, N, 4))
    assert epoch_order([4, 3], 5, 1, shuffle=False).tolist() == list(range(7))
    ds = TokenDataset(dataset, batch_size=4, seed=3, rank=0, world_size=1, shuffle_window=6)
    serial = indices(list(TokenLoader(ds)))
    assert indices(list(TokenLoader(ds, num_workers=2))) == serial == indices(list(ds.batches(0)))


def test_workers_stream_across_epochs_in_order(dataset: Path) -> None:
    # 7 batches per epoch over 2 workers: the round-robin must carry over the epoch boundary, and the
    # workers must not restart between epochs (they prefetch into the next one).
    ds = TokenDataset(dataset, batch_size=4, seed=5, rank=0, world_size=1, drop_last=False, shuffle_window=6)
    loader = TokenLoader(ds, num_workers=2)
    got = [indices(list(loader)) for _ in range(3)]
    stream = loader._stream
    assert got == [indices(list(ds.batches(epoch))) for epoch in range(3)]
    partial = []
    for batch in loader:  # stop mid-epoch, then continue: same stream, the position kept
        partial.append(batch)
        if len(partial) == 3:
            break
    rest = list(loader)
    assert loader._stream is stream and indices(partial + rest) == indices(list(ds.batches(3)))


def test_resume_mid_epoch_yields_exactly_the_remaining_samples(dataset: Path) -> None:
    def make() -> TokenLoader:
        ds = TokenDataset(dataset, batch_size=4, rank=1, world_size=2, drop_last=False, shuffle_window=6,
                          augment=Augment(brightness=0.3, contrast=0.3))
        return TokenLoader(ds, num_workers=2)

    straight = make()
    reference = list(straight) + list(straight)  # two epochs of 4 batches
    assert len(reference) == 8
    assert all(b["image"].dtype == torch.float32 for b in reference)  # colour jitter keeps float32

    first = make()
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 2:
            break
    state = first.state_dict()
    assert state == {"epoch": 0, "samples": 8, "seed": 0, "world_size": 2}

    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == 2
    tail = list(resumed)
    assert resumed.state_dict()["epoch"] == 1
    tail += list(resumed)
    for got, want in zip(head + tail, reference, strict=True):
        assert got["key"] == want["key"]
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["tokens"], want["tokens"])
        assert torch.equal(got["flip"], want["flip"])

    with pytest.raises(ValueError, match="world_size"):
        make().load_state_dict({**state, "world_size": 3})


def test_only_manifest_shards_are_read(copy: Path) -> None:
    shutil.copy(copy / "shard-00000.tar", copy / "shard-99999.tar")  # same keys again, not in the manifest
    ds = TokenDataset(copy, batch_size=4, rank=0, world_size=1, drop_last=False, shuffle=False)
    keys = [k for b in ds.batches(0) for k in b["key"]]
    assert keys[:N] == list(stored(copy)) and len(keys) == 28  # one padded repeat
    with pytest.raises(LoaderError, match="not in the manifest"):
        ds.read_shard("shard-99999.tar")


@pytest.mark.parametrize("path", ["../shard-00000.tar", "/etc/shard.tar", "sub/shard-00000.tar",
                                  "s3://bucket/shard.tar", ".hidden.tar", "shard-00000.npy"])
def test_manifest_pointing_outside_the_dataset_is_refused(copy: Path, path: str) -> None:
    rewrite_manifest(copy, lambda m: m["shards"][0].update(path=path))
    with pytest.raises(LoaderError, match="plain .tar name"):
        TokenDataset(copy, batch_size=4, rank=0, world_size=1)


def test_malformed_shard_checksum_is_refused(copy: Path) -> None:
    rewrite_manifest(copy, lambda m: m["shards"][0].update(sha256="../../escape"))
    with pytest.raises(LoaderError, match="sha256"):
        TokenDataset(copy, batch_size=4, rank=0, world_size=1)


def test_tokenizer_id_must_match(dataset: Path) -> None:
    expected = read_manifest(dataset)["tokenizer_id"]
    TokenDataset(dataset, batch_size=4, rank=0, world_size=1, expect_tokenizer_id=expected)
    with pytest.raises(LoaderError, match="tokenizer_id"):
        TokenDataset(dataset, batch_size=4, rank=0, world_size=1, expect_tokenizer_id="0" * 24)


def test_checksum_and_size_mismatches_are_detected(copy: Path) -> None:
    shard = copy / "shard-00002.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # in the tar's end padding: the samples still parse, only the checksum can tell
    shard.write_bytes(bytes(data))
    ds = TokenDataset(copy, batch_size=4, rank=0, world_size=1, drop_last=False)
    with pytest.raises(LoaderError, match="sha256"):
        list(ds.batches(0))
    with pytest.raises(LoaderError, match="sha256"):  # raised in a worker, re-raised with its type
        list(TokenLoader(ds, num_workers=2))
    unchecked = TokenDataset(copy, batch_size=4, rank=0, world_size=1, drop_last=False, verify=False)
    assert len(list(unchecked.batches(0))) == 7
    shard.write_bytes(bytes(data) + b"\0" * 512)
    with pytest.raises(LoaderError, match="bytes"):
        list(TokenDataset(copy, batch_size=4, rank=0, world_size=1, drop_last=False, verify=False).batches(0))


def test_images_are_the_tokenized_view_and_tokens_the_stored_grid(dataset: Path) -> None:
    samples = stored(dataset)
    pre = Preprocess(32, render=read_manifest(dataset)["preprocess"]["render"])  # the render the dataset records
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    ds = TokenDataset(dataset, batch_size=4, rank=0, world_size=1, drop_last=False)
    seen = set()
    for batch in ds.batches(0):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 32, 32)
        assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (4, 4, 4)
        for image, tokens, label, key in zip(batch["image"], batch["tokens"], batch["label"], batch["key"],
                                             strict=True):
            s = samples[key]
            ext = next(e for e in ("png", "jpg") if e in s)
            pixels = decode_view(s[ext], pre).pixels.astype(np.float32) / 255.0
            want = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())
            assert torch.allclose(image, want, atol=1e-6)
            assert torch.equal(tokens, torch.from_numpy(decode_npy(s["tokens.npy"]).astype(np.int64)))
            assert label.item() == json.loads(s["json"])["label"]
            seen.add(key)
    assert seen == set(samples)
    raw = TokenDataset(dataset, batch_size=4, rank=0, world_size=1, mean=(0, 0, 0), std=(1, 1, 1)).sample(5)
    key5 = list(samples)[5]
    assert raw["key"] == key5
    ext = next(e for e in ("png", "jpg") if e in samples[key5])
    assert torch.equal((raw["image"] * 255).round().to(torch.uint8).permute(1, 2, 0),
                       torch.from_numpy(decode_view(samples[key5][ext], pre).pixels.copy()))


def test_colour_jitter_keeps_tokens_and_changes_pixels(dataset: Path) -> None:
    kw = {"batch_size": 4, "rank": 0, "world_size": 1, "drop_last": False}
    plain = list(TokenDataset(dataset, **kw).batches(0))
    assert not torch.cat([b["flip"] for b in plain]).any() and not torch.cat([b["view"] for b in plain]).any()
    jittered = list(TokenDataset(dataset, augment=Augment(brightness=0.4, contrast=0.4), **kw).batches(0))
    assert all(torch.equal(p["tokens"], j["tokens"]) for p, j in zip(plain, jittered, strict=True))
    assert not torch.equal(plain[0]["image"], jittered[0]["image"])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_unknown_members_are_never_unpickled(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    shard = copy / "shard-00000.tar"
    with open(shard, "rb") as f:
        samples = list(iter_tar(f))
    writer = ShardWriter(shard)
    for s in samples:
        writer.write({**s, "pyd": pickle.dumps(_Payload(marker))})
    digest, size = writer.finish()
    writer.commit()
    rewrite_manifest(copy, lambda m: m["shards"][0].update(sha256=digest, bytes=size))
    ds = TokenDataset(copy, batch_size=4, rank=0, world_size=1, drop_last=False, shuffle=False)
    assert len(list(ds.batches(0))) == 7 and not marker.exists()


def test_remote_shards_are_cached_with_lru_eviction(dataset: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    base = f"/kmim-{uuid.uuid4().hex[:8]}"
    for p in dataset.iterdir():
        fs.pipe(f"{base}/{p.name}", p.read_bytes())
    cache = tmp_path / "cache"
    sizes = [e["bytes"] for e in read_manifest(dataset)["shards"]]
    try:
        ds = TokenDataset(f"memory://{base}", batch_size=4, rank=0, world_size=1, drop_last=False,
                          cache_dir=cache, cache_bytes=3 * max(sizes))
        keys = [k for b in ds.batches(0) for k in b["key"]]
        assert set(keys) == set(stored(dataset))
        files = list(cache.iterdir())
        assert 0 < len(files) <= 3 and sum(f.stat().st_size for f in files) <= 3 * max(sizes)
        assert all(sha256_file(f)[0] == f.stem for f in files)
        # A corrupted cache entry is fetched again; a corrupted remote shard is refused.
        files[0].write_bytes(b"x" * files[0].stat().st_size)
        entry = next(e for e in read_manifest(dataset)["shards"] if e["sha256"] == files[0].stem)
        name = entry["path"]
        assert len(ds.read_shard(name)) == entry["samples"] and sha256_file(files[0])[0] == files[0].stem
        fs.pipe(f"{base}/{name}", b"y" * entry["bytes"])
        files[0].unlink()
        with pytest.raises(LoaderError, match="sha256"):
            ds.read_shard(name)
    finally:
        fs.rm(base, recursive=True)
    local = TokenDataset(f"file://{dataset}", batch_size=4, rank=0, world_size=1, cache_dir=tmp_path / "unused")
    assert len(list(local.batches(0))) == 6 and not (tmp_path / "unused").exists()


def test_too_small_for_one_global_batch(dataset: Path) -> None:
    with pytest.raises(LoaderError, match="drop_last=False"):
        TokenDataset(dataset, batch_size=16, rank=0, world_size=2)
    padded = [TokenDataset(dataset, batch_size=16, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert [p.batches_per_epoch for p in padded] == [1, 1]
    assert set(padded[0].rank_sequence(0)) | set(padded[1].rank_sequence(0)) == set(range(N))
