"""Fit the codebook: sample patch features from input shards, then mini-batch k-means, in-process or on Ray.

A small fit sample (:func:`fits_in_driver`: one node, at most :data:`DRIVER_FIT_BYTES`) is fitted in one
process, also on Ray: Ray tasks sample the shards (warming the workers that tokenize next) and the driver
fits without a round trip per step. Otherwise, on Ray, the fit sample never passes through the driver:
k-means actors (:class:`PartitionWorker`) each sample and hold a contiguous run of shards, i.e. a contiguous
range of the global point index (the concatenation in input-shard order, whatever the number of actors).
Every step the driver broadcasts the centroids once, each actor returns the per-centroid sums and counts of
its share of the mini-batch (a few milliseconds of Ray per step), and the driver runs the same update as the
in-process fit (:func:`kmim.tokenizers.kmeans.run_minibatch`): 1 or N actors or none give the same centroids
up to float64 rounding of the sums (and, in the fast fit, up to the float32 near ties a share decides).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kmim.files import AtomicFile
from kmim.pipeline.runners import cpus_per_gpu, ensure_ray, map_shards
from kmim.pipeline.sources import InputShard
from kmim.pipeline.stages import FitSampleStage, json_digest
from kmim.tokenizers.extractors import build_extractor
from kmim.tokenizers.kmeans import KMeansResult, Partition, fit_kmeans, part_digest, points_digest, run_minibatch
from kmim.tokenizers.learned import torch_device
from kmim.tokenizers.minibatch import StepStats, merge_stats

# The largest fit sample (float32 features before subsampling, see :func:`sample_bytes`) that the Ray runner
# gathers in its driver on a single-node cluster, where one process fits without a round trip per step.
DRIVER_FIT_BYTES = 2 << 30


class FitError(RuntimeError):
    """The fit sample could not be built (a shard failed, or too few features)."""


@dataclass(frozen=True)
class FitSpec:
    """The k-means fit: ``k`` centroids, ``epochs`` passes over the fit sample in mini-batches of ``batch_size``
    points, seeded by ``seed``, nearest-centroid search ``assign``, mini-batch updates by the exact nearest
    centroid when ``exact``, else by the float32 top-1; run by ``runner``: ``local`` on ``device`` (resolved;
    None: CUDA when available), or ``ray`` on the cluster at ``ray_address`` (None: RAY_ADDRESS, else an embedded
    one): in the driver when the sample is small and the cluster one node and ``workers`` is None, else with
    ``workers`` actors (None: one per GPU, else one per CPU up to 16)."""

    k: int
    epochs: int
    batch_size: int
    seed: int
    assign: str
    exact: bool
    runner: str
    device: str | None
    workers: int | None
    ray_address: str | None


@dataclass(frozen=True)
class FitSample:
    """Which features make up the fit sample: those ``sampler`` draws from each of ``shards``, at most ``limit``
    points in all (drawn by ``seed`` when there are more)."""

    shards: tuple[InputShard, ...]
    sampler: FitSampleStage
    limit: int
    seed: int
    cache: str | None  # absolute directory of the fp16 feature cache, if any


# ---- sampling -------------------------------------------------------------------------------------------


def _cache_file(shard: InputShard, sample: FitSample) -> Path:
    """The cache file of the shard's fit features: named by a digest of everything that determines them."""
    s = sample.sampler
    key = [build_extractor(s.extractor).metadata(), s.decode.preprocess.describe(), s.seed, s.images, s.patches,
           repr(shard)]
    return Path(sample.cache) / f"features-{json_digest(key)}.npy"


def shard_features(shard: InputShard, sample: FitSample) -> np.ndarray:
    """float32 [n, D]: the shard's fit features, through the fp16 cache when there is one (then fresh
    features take the same fp16 rounding as cached ones)."""
    if sample.cache is None:
        return sample.sampler(shard)
    path = _cache_file(shard, sample)
    if path.exists():
        return np.load(path, allow_pickle=False).astype(np.float32)
    feats = sample.sampler(shard).astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as f:
        np.save(f, feats, allow_pickle=False)
    return feats.astype(np.float32)


def subsample(rows: Sequence[int], limit: int, seed: int) -> list[np.ndarray | None]:
    """Per part, the sorted row indices to keep (None = all) so that at most ``limit`` of the concatenated
    rows remain, drawn uniformly by ``seed``; the kept points stay in concatenation order."""
    total = int(sum(rows))
    if total <= limit:
        return [None] * len(rows)
    pick = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    bounds = np.cumsum([0, *rows])
    return [pick[(pick >= lo) & (pick < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _kept(part: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    return part if keep is None else part[keep]


# ---- k-means actors ---------------------------------------------------------------------------------------


class PartitionWorker:
    """A Ray actor holding one contiguous range of the fit points; assignment on its GPU if it has one.

    Filled part by part (:meth:`add_chunk`, :meth:`add_shard`; calls run in submission order), then
    :meth:`build` keeps the sampled rows and fixes the range's global offset."""

    def __init__(self, metric: str, method: str, threads: int, device: str, exact: bool = True) -> None:
        torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
        self.metric, self.method, self.exact = metric, method, exact
        # An actor without a GPU of its own stays on the CPU even on a GPU node, where it could see every GPU.
        self.device = torch_device(device)
        self.parts: list[np.ndarray] = []
        self.part: Partition | None = None

    def add_chunk(self, chunk: np.ndarray) -> int:
        """Append float32 [n, D] points; returns n."""
        self.parts.append(chunk)
        return chunk.shape[0]

    def add_shard(self, shard: InputShard, sample: FitSample) -> int:
        """Append the shard's fit features (sampled here, on this actor's GPU if any); returns their count."""
        return self.add_chunk(shard_features(shard, sample))

    def build(self, keep: list[np.ndarray | None], offset: int) -> tuple[list[str], int]:
        """Keep the given rows of each part (None = all); they are global points offset, offset + 1, ...

        Returns (digest per part, dimension)."""
        parts = [_kept(p, k) for p, k in zip(self.parts, keep, strict=True)]
        self.parts = []
        x = torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))
        self.part = Partition(x, offset, metric=self.metric, method=self.method, device=self.device,
                              exact=self.exact)
        return [part_digest(p) for p in parts], x.shape[1]

    def fast_method(self, stored: str | None) -> str:
        return self.part.fast_method(stored)

    def rows(self, local_idx: torch.Tensor) -> torch.Tensor:
        return self.part.rows(local_idx)

    def start_epoch(self, order: np.ndarray) -> None:
        self.part.start_epoch(torch.from_numpy(np.array(order)))  # Ray hands arrays over read-only

    def step(self, centroids: np.ndarray, start: int, stop: int, candidates: int) -> StepStats:
        """:meth:`Partition.step` with centroids float32 [K, D] and the statistics' tensors as NumPy arrays."""
        return _on_wire(self.part.step(torch.tensor(centroids), start, stop, candidates))

    def evaluate(self, centroids: np.ndarray, chunk: int) -> tuple[float, torch.Tensor]:
        return self.part.evaluate(torch.tensor(centroids), chunk)


def _on_wire(stats: StepStats) -> StepStats:
    """The statistics with NumPy arrays for tensors: Ray ships arrays as buffers, tensors through torch.save (a
    millisecond or more per step)."""
    return replace(stats, **{f.name: getattr(stats, f.name).numpy() for f in fields(stats)
                             if isinstance(getattr(stats, f.name), torch.Tensor)})


def _off_wire(stats: StepStats) -> StepStats:
    """:func:`_on_wire` undone (copies: Ray hands arrays over read-only)."""
    return replace(stats, **{f.name: torch.tensor(getattr(stats, f.name)) for f in fields(stats)
                             if isinstance(getattr(stats, f.name), np.ndarray)})


class RayData:
    """:class:`kmim.tokenizers.kmeans.FitData` over Ray actors, each holding a contiguous range of points.

    ``items`` in global order are object refs of float32 [n_i, D] arrays, or (with ``sample``) input shards
    whose fit features each actor samples itself; then at most ``sample.limit`` points are kept, drawn by
    ``sample.seed``. Each of the ``workers`` actors gets a contiguous run of items; ``exact`` as in
    :class:`kmim.tokenizers.kmeans.Partition`. Ray must be initialized. Use as a context manager (kills the actors).
    """

    def __init__(self, items: Sequence[Any], *, workers: int, metric: str = "l2", method: str = "auto",
                 sample: FitSample | None = None, gpu: bool = False, exact: bool = True) -> None:
        import ray

        self.exact = exact

        runs = [r for r in np.array_split(np.arange(len(items)), min(workers, len(items))) if r.size]
        if gpu:  # one whole GPU and its node's CPU share per actor (see runners.cpus_per_gpu)
            cpus = cpus_per_gpu()
            actor = ray.remote(PartitionWorker).options(num_cpus=cpus, num_gpus=1, max_restarts=0)
        else:  # at most one CPU each, so any number of actors fits on any cluster; threads use their share
            cpus = float(ray.cluster_resources().get("CPU", 1)) / len(runs)
            actor = ray.remote(PartitionWorker).options(num_cpus=min(cpus, 1.0), num_gpus=0,
                                                        scheduling_strategy="SPREAD", max_restarts=0)
        self.actors = [actor.remote(metric, method, max(1, int(cpus)), "cuda" if gpu else "cpu", exact) for _ in runs]
        rows = self._fill(items, runs, sample)
        keep = subsample(rows, sample.limit, sample.seed) if sample is not None else [None] * len(rows)
        kept = [n if k is None else k.size for n, k in zip(rows, keep, strict=True)]
        offsets = np.cumsum([0] + [sum(kept[r[0]:r[-1] + 1]) for r in runs])
        built = ray.get([a.build.remote(keep[r[0]:r[-1] + 1], int(o))
                         for a, r, o in zip(self.actors, runs, offsets, strict=False)])
        self.bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
        self.digest = points_digest([d for digests, _ in built for d in digests])
        self.n, self.dim = int(offsets[-1]), built[0][1]

    def _fill(self, items: Sequence[Any], runs: list[np.ndarray], sample: FitSample | None) -> list[int]:
        """Hand each actor its items; returns the rows of each item, in order."""
        import ray

        if sample is not None:
            sample_ref = ray.put(sample)
        refs = {}
        for a, run in zip(self.actors, runs, strict=True):
            for i in run:
                refs[a.add_shard.remote(items[i], sample_ref) if sample is not None
                     else a.add_chunk.remote(items[i])] = int(i)
        rows = [0] * len(items)
        with tqdm(total=len(refs), desc="sample features" if sample else "load points", unit="part",
                  dynamic_ncols=True) as bar:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                i = refs.pop(done[0])
                try:
                    rows[i] = ray.get(done[0])
                except Exception as e:  # noqa: BLE001 - named per item for the caller
                    what = items[i].describe() if sample is not None else f"chunk {i}"
                    raise FitError(f"loading fit features from {what} failed: {getattr(e, 'cause', None) or e}") from e
                bar.update()
        return rows

    def __enter__(self) -> RayData:
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)

    def fast_method(self, stored: str | None) -> str:
        """The first actor's choice, which every actor then uses: one backend for the whole fit."""
        import ray

        method = ray.get(self.actors[0].fast_method.remote(stored))
        ray.get([a.fast_method.remote(method) for a in self.actors[1:]])
        return method

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        import ray

        out = torch.empty(idx.numel(), self.dim)
        asked = []
        for a, (lo, hi) in zip(self.actors, self.bounds, strict=True):
            mask = (idx >= lo) & (idx < hi)
            asked.append((mask, a.rows.remote(idx[mask] - lo)))
        for mask, ref in asked:
            out[mask] = ray.get(ref)
        return out

    def start_epoch(self, order: torch.Tensor) -> None:
        import ray

        ref = ray.put(order.numpy())
        ray.get([a.start_epoch.remote(ref) for a in self.actors])

    def step(self, centroids: torch.Tensor, start: int, stop: int, candidates: int) -> StepStats:
        import ray

        ref = ray.put(centroids.numpy())
        parts = ray.get([a.step.remote(ref, start, stop, candidates) for a in self.actors])
        return merge_stats([_off_wire(p) for p in parts], candidates)

    def evaluate(self, centroids: torch.Tensor, chunk: int) -> tuple[float, torch.Tensor]:
        import ray

        ref = ray.put(centroids.numpy())
        parts = ray.get([a.evaluate.remote(ref, chunk) for a in self.actors])
        return sum(total for total, _ in parts), torch.stack([used for _, used in parts]).any(0)


def fit_kmeans_ray(chunks: Sequence[Any], k: int, *, workers: int, epochs: int, batch_size: int, seed: int,
                   metric: str = "l2", method: str = "auto", init_size: int | None = None,
                   checkpoint: Path | None = None, log: Callable[[dict], None] | None = None,
                   exact: bool = True) -> KMeansResult:
    """:func:`kmim.tokenizers.kmeans.fit_kmeans` on the concatenation of ``chunks`` (object refs of float32
    [n_i, D]) held by ``workers`` Ray actors. Ray must be initialized."""
    with RayData(chunks, workers=workers, metric=metric, method=method, exact=exact) as data:
        return run_minibatch(data, k, epochs=epochs, batch_size=batch_size, seed=seed, metric=metric,
                             init_size=init_size, checkpoint=checkpoint, data_digest=data.digest, log_epoch=log)


# ---- the job's fit ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitOutcome:
    result: KMeansResult
    points: int
    dim: int
    digest: str  # of the fit sample (float32 points in global order), the same for every runner


def _too_few(points: int, k: int) -> None:
    if points < k:
        raise FitError(f"only {points} patch features for k={k} (field 'k'): too few decodable images")


def _sampled_points(sample: FitSample, runner: str, address: str | None, gpus: int) -> list[np.ndarray]:
    """The fit sample's kept points per sampled shard, in shard order, gathered in this process: sampled here
    (local) or by Ray tasks (ray; on the job's GPU actors when ``gpus``)."""
    found: dict[int, np.ndarray] = {}  # by shard index: Ray tasks finish in any order
    for shard, feats, error in map_shards(shard_features, list(sample.shards), sample, runner=runner,
                                          address=address, gpus=gpus, desc="sample features"):
        if error is not None:
            raise FitError(f"sampling fit features from {shard.describe()} failed: {error}") from error
        found[shard.index] = feats
    parts = [found[shard.index] for shard in sample.shards]
    keep = subsample([p.shape[0] for p in parts], sample.limit, sample.seed)
    return [_kept(p, k) for p, k in zip(parts, keep, strict=True)]


def _kmeans_device(fit: FitSpec) -> torch.device | None:
    """Where an in-process k-means runs (None: CUDA when this machine has it): the job's device when local; in a
    Ray driver the CPU when the job's device is, else None (a cuda device resolved for the workers)."""
    if fit.device is None or (fit.runner != "local" and fit.device != "cpu"):
        return None
    return torch_device(fit.device)


def _fit_in_process(fit: FitSpec, sample: FitSample, metric: str, checkpoint: Path, log: Callable[[dict], None],
                    gpus: int = 0) -> FitOutcome:
    """The k-means in this process (on :func:`_kmeans_device`), on the fit sample gathered by
    :func:`_sampled_points`."""
    parts = _sampled_points(sample, fit.runner, fit.ray_address, gpus)
    x = torch.from_numpy(np.concatenate(parts))
    _too_few(x.shape[0], fit.k)
    digest = points_digest([part_digest(p) for p in parts])
    result = fit_kmeans(x, fit.k, epochs=fit.epochs, batch_size=fit.batch_size, seed=fit.seed, metric=metric,
                        method=fit.assign, checkpoint=checkpoint, data_digest=digest, log=log,
                        device=_kmeans_device(fit), exact=fit.exact)
    return FitOutcome(result, x.shape[0], x.shape[1], digest)


def _fit_ray(fit: FitSpec, sample: FitSample, metric: str, checkpoint: Path, log: Callable[[dict], None],
             gpus: int) -> FitOutcome:
    """On Ray actors, each sampling and holding a contiguous run of the fit sample's shards."""
    import ray

    # With GPUs, one actor per GPU; without, one single-threaded actor per CPU samples the fit features in
    # parallel (sampling is decode-bound); past ~16 actors the per-step gather costs more than it saves.
    workers = fit.workers or gpus or max(1, min(16, int(ray.cluster_resources().get("CPU", 1))))
    with RayData(sample.shards, workers=workers, metric=metric, method=fit.assign, sample=sample,
                 gpu=gpus > 0, exact=fit.exact) as data:
        _too_few(data.n, fit.k)
        result = run_minibatch(data, fit.k, epochs=fit.epochs, batch_size=fit.batch_size, seed=fit.seed,
                               metric=metric, checkpoint=checkpoint, data_digest=data.digest, log_epoch=log)
        return FitOutcome(result, data.n, data.dim, data.digest)


def sample_bytes(sample: FitSample, dim: int) -> int:
    """Upper bound of the bytes of the fit features gathered before subsampling: float32 [images x patches, dim]
    from every sampled shard."""
    return len(sample.shards) * sample.sampler.images * sample.sampler.patches * dim * 4


def fits_in_driver(fit: FitSpec, sample: FitSample, dim: int) -> bool:
    """Whether the Ray runner fits in its driver: no ``workers`` asked for, a single-node cluster, and at most
    :data:`DRIVER_FIT_BYTES` of fit features. Ray must be initialized."""
    import ray

    return (fit.workers is None and sample_bytes(sample, dim) <= DRIVER_FIT_BYTES
            and sum(1 for node in ray.nodes() if node.get("Alive")) == 1)


def fit_sample_kmeans(fit: FitSpec, sample: FitSample, *, metric: str, dim: int, checkpoint: Path,
                      log: Callable[[dict], None], gpus: int = 0) -> FitOutcome:
    """Sample the fit features (``dim`` per point) and fit ``fit.k`` centroids with ``fit.runner``: in this
    process (local, or Ray when :func:`fits_in_driver`: the features sampled by Ray tasks, the k-means here) or
    with ``fit.workers`` Ray actors (one whole GPU each when ``gpus``, the job's GPU actors, is not 0).
    All run the same algorithm on the same points, checkpointing every epoch into ``checkpoint`` and resuming
    from it. ``fit`` and ``sample`` hold resolved settings (:func:`kmim.pipeline.compute.resolve_compute`)."""
    if fit.runner == "local":
        return _fit_in_process(fit, sample, metric, checkpoint, log)
    ensure_ray(fit.ray_address)
    if fits_in_driver(fit, sample, dim):
        return _fit_in_process(fit, sample, metric, checkpoint, log, gpus)
    return _fit_ray(fit, sample, metric, checkpoint, log, gpus)
