"""Distributed mini-batch k-means (Ray actors) is the in-process fit; epoch checkpoints resume it exactly."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import job_overrides

from kmim.config import load_config
from kmim.datasets.codebook import Codebook
from kmim.datasets.manifest import CODEBOOK
from kmim.pipeline import fit as fit_module
from kmim.pipeline.fit import fit_kmeans_ray, subsample
from kmim.pipeline.job import _fit_codebook
from kmim.pipeline.sources import plan_inputs
from kmim.pipeline.specs import source_spec
from kmim.tokenizers.kmeans import CHECKPOINT, fit_kmeans

K, EPOCHS, BATCH = 12, 4, 256


def blobs(n: int = 3000, d: int = 8, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, (K, d))
    return torch.from_numpy((centers[rng.integers(K, size=n)] + rng.normal(0, 1.0, (n, d))).astype(np.float32))


def chunks(ray, x: torch.Tensor, sizes: list[int]) -> list:
    """Object refs of x split into parts of the given sizes (the last part takes the rest)."""
    bounds = np.cumsum([0, *sizes, x.shape[0] - sum(sizes)])
    return [ray.put(x[lo:hi].numpy()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [{**s, "inertia": pytest.approx(s["inertia"], rel=1e-9)} for s in a] == b


class Crash(Exception):
    pass


def crash_after(epoch: int):
    def log(stats: dict) -> None:
        if stats["epoch"] == epoch:
            raise Crash

    return log


@pytest.mark.parametrize("workers", [1, 3])
def test_distributed_equals_in_process_fit(ray_local, workers: int) -> None:
    x = blobs()
    local = fit_kmeans(x, K, epochs=EPOCHS, batch_size=BATCH, seed=7)
    dist = fit_kmeans_ray(chunks(ray_local, x, [500, 130, 900, 70, 600]), K, workers=workers, epochs=EPOCHS,
                          batch_size=BATCH, seed=7)
    assert abs(dist.inertia - local.inertia) <= 0.005 * local.inertia
    assert torch.allclose(dist.centroids, local.centroids, rtol=0, atol=1e-5)
    assert_same_history(dist.history, local.history)
    if workers == 1:  # one partition: the very same float operations
        assert torch.equal(dist.centroids, local.centroids) and dist.inertia == local.inertia


def test_distributed_reseeds_like_in_process(ray_local) -> None:
    # 3 distinct points, k=6: duplicate centroids go empty every epoch and are re-seeded from the last batch,
    # whose points (all at cost 0: ties broken by batch position) are spread over the actors
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [10.0, 10.0]])[torch.randint(3, (900,), generator=g)]
    local = fit_kmeans(x, 6, epochs=3, batch_size=128, seed=0)
    dist = fit_kmeans_ray(chunks(ray_local, x, [450]), 6, workers=2, epochs=3, batch_size=128, seed=0)
    assert sum(s["reseeded"] for s in local.history) > 0
    assert [s["reseeded"] for s in dist.history] == [s["reseeded"] for s in local.history]
    assert torch.allclose(dist.centroids, local.centroids, rtol=0, atol=1e-5)


def test_spherical_distributed_equals_in_process(ray_local) -> None:
    x = blobs(1200, 6, seed=2)
    local = fit_kmeans(x, 5, epochs=2, batch_size=200, seed=0, metric="ip")
    dist = fit_kmeans_ray(chunks(ray_local, x, [400, 400]), 5, workers=2, epochs=2, batch_size=200, seed=0,
                          metric="ip")
    assert torch.allclose(dist.centroids, local.centroids, rtol=0, atol=1e-5)
    assert torch.allclose(dist.centroids.norm(dim=1), torch.ones(5), atol=1e-5)


def test_distributed_resumes_from_epoch_checkpoint(ray_local, tmp_path: Path) -> None:
    x = blobs(seed=1)
    refs = chunks(ray_local, x, [1000, 1000])
    straight = fit_kmeans(x, K, epochs=EPOCHS, batch_size=BATCH, seed=3)
    with pytest.raises(Crash):
        fit_kmeans_ray(refs, K, workers=2, epochs=EPOCHS, batch_size=BATCH, seed=3, checkpoint=tmp_path,
                       log=crash_after(2))
    epochs_run: list[int] = []
    # resumed on another number of actors: the partition does not change the algorithm
    resumed = fit_kmeans_ray(refs, K, workers=1, epochs=EPOCHS, batch_size=BATCH, seed=3, checkpoint=tmp_path,
                             log=lambda s: epochs_run.append(s["epoch"]))
    assert epochs_run == [3, 4]
    assert torch.allclose(resumed.centroids, straight.centroids, rtol=0, atol=1e-6)
    assert_same_history(resumed.history, straight.history)


def test_in_process_resume_is_bit_identical(tmp_path: Path) -> None:
    x = blobs(seed=2)
    straight = fit_kmeans(x, K, epochs=EPOCHS, batch_size=BATCH, seed=5)
    with pytest.raises(Crash):
        fit_kmeans(x, K, epochs=EPOCHS, batch_size=BATCH, seed=5, checkpoint=tmp_path, log=crash_after(2))
    assert (tmp_path / CHECKPOINT).exists()
    resumed = fit_kmeans(x, K, epochs=EPOCHS, batch_size=BATCH, seed=5, checkpoint=tmp_path)
    assert torch.equal(resumed.centroids, straight.centroids) and resumed.inertia == straight.inertia
    assert resumed.history == straight.history
    longer = fit_kmeans(x, K, epochs=EPOCHS + 1, batch_size=BATCH, seed=5, checkpoint=tmp_path)  # continues
    assert torch.equal(longer.centroids, fit_kmeans(x, K, epochs=EPOCHS + 1, batch_size=BATCH, seed=5).centroids)


@pytest.mark.parametrize("change", [{"seed": 6}, {"batch_size": 128}, {"data": True}, {"epochs": 1}])
def test_stale_checkpoint_is_never_reused(tmp_path: Path, caplog, change: dict) -> None:
    x = blobs(seed=3)
    fit_kmeans(x, K, epochs=2, batch_size=BATCH, seed=5, checkpoint=tmp_path)
    kw = {"epochs": 2, "batch_size": BATCH, "seed": 5, **{k: v for k, v in change.items() if k != "data"}}
    if "data" in change:
        x = x.clone()
        x[17, 3] += 1e-3
    with caplog.at_level(logging.WARNING, logger="kmim"):
        again = fit_kmeans(x, K, checkpoint=tmp_path, **kw)
    assert "ignoring k-means checkpoint" in caplog.text
    assert torch.equal(again.centroids, fit_kmeans(x, K, **kw).centroids)


def test_subsample_keeps_sorted_rows_of_each_part() -> None:
    keep = subsample([5, 0, 7, 3], 9, seed=1)
    assert sum(k.size for k in keep) == 9 and all(np.all(np.diff(k) > 0) for k in keep if k.size > 1)
    assert [k.max(initial=-1) < n for k, n in zip(keep, [5, 0, 7, 3], strict=True)] == [True] * 4
    assert subsample([5, 7], 12, seed=1) == [None, None]


def test_job_fit_on_ray_actors_gives_the_local_codebook(image_folder: Path, tmp_path: Path, ray_local) -> None:
    def fit(name: str, **kw) -> Codebook:
        cfg = load_config(None, job_overrides(out=str(tmp_path / name), input=str(image_folder), fit_images=256,
                                              kmeans_batch_size=128, fit_exact=True, **kw))
        (tmp_path / name).mkdir()
        book = _fit_codebook(cfg, plan_inputs(source_spec(cfg))[0], tmp_path / name / CODEBOOK, gpus=0)
        assert not (tmp_path / name / "kmeans-checkpoint").exists()
        return book

    local = fit("local", feature_cache=str(tmp_path / "cache-local"))
    ray = fit("ray", runner="ray", kmeans_workers=2, feature_cache=str(tmp_path / "cache-ray"))
    assert local.metadata["kmeans"]["fit_points"] == 36 * 8  # 4 shards, 2000 / 256 patches per image
    # fp16-cached features make every float64 partial sum exact: bit-equal centroids, equal tokenizer_id
    assert ray.tokenizer_id == local.tokenizer_id
    assert sorted(p.name for p in (tmp_path / "cache-ray").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cache-local").iterdir())
    local32 = fit("local32", fit_patches=30)  # 36 patches, 30 kept: the subsample spans the actors
    ray32 = fit("ray32", runner="ray", kmeans_workers=2, fit_patches=30)
    assert ray32.metadata == local32.metadata and ray32.metadata["kmeans"]["fit_points"] == 30
    assert torch.allclose(ray32.centroids, local32.centroids, rtol=0, atol=1e-5)


def test_fast_distributed_fit_uses_one_backend_and_matches_in_process(ray_local) -> None:
    x = blobs(seed=4)
    local = fit_kmeans(x, K, epochs=EPOCHS, batch_size=BATCH, seed=7, exact=False, method="torch")
    dist = fit_kmeans_ray(chunks(ray_local, x, [700, 900]), K, workers=2, epochs=EPOCHS, batch_size=BATCH, seed=7,
                          exact=False, method="torch")
    assert local.assign == dist.assign == "torch"
    assert abs(dist.inertia - local.inertia) <= 0.005 * local.inertia
    auto = fit_kmeans_ray(chunks(ray_local, x, [700, 900]), K, workers=2, epochs=EPOCHS, batch_size=BATCH, seed=7,
                          exact=False)
    assert auto.assign == "faiss"  # on the CPU, whatever a timing would say


def test_fast_fit_resumes_bit_identical_on_its_backend(tmp_path: Path, caplog) -> None:
    x = blobs(seed=5)
    kw = {"epochs": EPOCHS, "batch_size": BATCH, "seed": 5, "exact": False}
    straight = fit_kmeans(x, K, **kw)
    with pytest.raises(Crash):
        fit_kmeans(x, K, checkpoint=tmp_path / "auto", log=crash_after(2), **kw)
    resumed = fit_kmeans(x, K, checkpoint=tmp_path / "auto", **kw)
    assert resumed.assign == straight.assign
    assert torch.equal(resumed.centroids, straight.centroids) and resumed.history == straight.history

    def crashed_on_torch(name: str) -> Path:
        with pytest.raises(Crash):
            fit_kmeans(x, K, checkpoint=tmp_path / name, log=crash_after(2), method="torch", **kw)
        return tmp_path / name

    # the recorded backend wins over a fresh choice ...
    epochs_run: list[int] = []
    again = fit_kmeans(x, K, checkpoint=crashed_on_torch("torch"), log=lambda s: epochs_run.append(s["epoch"]), **kw)
    assert again.assign == "torch" and epochs_run == [3, 4]
    # ... and another backend, or the exact fit, never reuses the checkpoint
    for other in ({"method": "faiss"}, {"exact": True}):
        with caplog.at_level(logging.WARNING, logger="kmim"):
            again = fit_kmeans(x, K, checkpoint=crashed_on_torch(str(other)), **{**kw, **other})
        assert "ignoring k-means checkpoint" in caplog.text
        assert torch.equal(again.centroids, fit_kmeans(x, K, **{**kw, **other}).centroids)
        caplog.clear()


def _job_fit(image_folder: Path, out: Path, **kw) -> Codebook:
    cfg = load_config(None, job_overrides(out=str(out), input=str(image_folder), fit_images=256,
                                          kmeans_batch_size=128, **kw))
    out.mkdir()
    return _fit_codebook(cfg, plan_inputs(source_spec(cfg))[0], out / CODEBOOK, gpus=0)


def test_small_ray_fit_runs_in_the_driver(image_folder: Path, tmp_path: Path, ray_local, monkeypatch) -> None:
    def no_actors(*args, **kwargs):
        raise AssertionError("a small fit on a one-node cluster must not start k-means actors")

    local = _job_fit(image_folder, tmp_path / "local")
    monkeypatch.setattr(fit_module, "RayData", no_actors)
    ray = _job_fit(image_folder, tmp_path / "ray", runner="ray")  # features sampled by Ray tasks
    assert ray.tokenizer_id == local.tokenizer_id
    assert ray.metadata["kmeans"]["fast_assign"] == ("torch" if torch.cuda.is_available() else "faiss")


def test_large_ray_fit_runs_on_actors(image_folder: Path, tmp_path: Path, ray_local, monkeypatch) -> None:
    built: list[int] = []

    class Spy(fit_module.RayData):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(len(self.actors))

    local = _job_fit(image_folder, tmp_path / "local", fit_exact=True)
    monkeypatch.setattr(fit_module, "RayData", Spy)
    monkeypatch.setattr(fit_module, "DRIVER_FIT_BYTES", 0)  # every sample is too large for the driver
    ray = _job_fit(image_folder, tmp_path / "ray", runner="ray", fit_exact=True)
    assert built == [2]  # one actor per CPU of the test cluster
    assert "fast_assign" not in ray.metadata["kmeans"]
    assert torch.allclose(ray.centroids, local.centroids, rtol=0, atol=1e-5)
