"""Mini-batch K-means (Sculley 2010) with greedy k-means++ initialization, in-process or over partitions.

One algorithm, one loop (:func:`run_minibatch`), over any :class:`FitData`: the points may sit in this
process (:class:`LocalData`, used by :func:`fit_kmeans`) or be split into contiguous ranges of the global
point index held by Ray actors (:mod:`kmim.pipeline.fit`). Each step, every range reports per-centroid
sums and counts of its points in that step's mini-batch (:func:`kmim.tokenizers.minibatch.batch_stats`);
the loop reduces them (:func:`kmim.tokenizers.minibatch.merge_stats`) and moves the centroids
(:func:`apply_step`). Sums are float64, so the result does not depend on how the points are split beyond
float64 rounding.

Two assignments drive the updates. Exact (``exact=True``): the exact nearest centroid on any device, backend
or thread count, so the fit does not depend on where it runs either (k-means++ depends on neither the thread
count nor, beyond float64 rounding, the device: :func:`kmeans_plus_plus`). Fast (``exact=False``): the float32
top-1 of one backend (faiss on the CPU, the torch GEMM on CUDA, or the one asked for; recorded in
:attr:`KMeansResult.assign`), about half the search work; a near tie may then go to either centroid, so the
fit is reproducible for a given backend, device and thread count only. Tokens written with the codebook are
exact nearest centroids either way.

Deterministic for a seed: every random draw comes from one seeded ``torch.Generator`` on the driver and
batches are a seeded permutation of the global index per epoch. ``metric="ip"`` is spherical k-means
(unit-norm centroids, assignment by maximum inner product) for L2-normalized features.

With a checkpoint directory, the state (centroids, counts, generator) is saved after every epoch and a
later fit with the same settings and data resumes from it, ending bit-identical to an uninterrupted fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kmim.files import atomic_write
from kmim.tokenizers.assign import exact_method, fast_method, nearest, torch_threads
from kmim.tokenizers.kmeanspp import kmeans_plus_plus
from kmim.tokenizers.minibatch import Scratch, StepStats, batch_stats, point_cost, widened

logger = logging.getLogger("kmim")
CHECKPOINT = "kmeans-state.safetensors"
_CHECKPOINT_FORMAT = "kmim-kmeans/1"
@dataclass
class KMeansResult:
    centroids: torch.Tensor  # float32 [K, D]
    inertia: float  # sum over the fit sample of squared distance (l2) or 1 - cosine (ip) to the nearest centroid
    utilization: float  # fraction of centroids nearest to at least one sample point
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, inertia (mean per point), utilization
    assign: str = "exact"  # the fit's assignment: "exact", or the float32 top-1 backend ("faiss" | "torch")


def _unit(c: torch.Tensor) -> torch.Tensor:
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


def part_digest(part: np.ndarray) -> str:
    """sha256 of one part of the points (float32 [n, D]), computed where it lives."""
    return hashlib.sha256(np.ascontiguousarray(part, dtype=np.float32).tobytes()).hexdigest()


def points_digest(part_digests: Sequence[str]) -> str:
    """Digest of the concatenated points from the digests of its parts, in order (no data moves)."""
    return hashlib.sha256(" ".join(part_digests).encode()).hexdigest()


# ---- the state and its updates ------------------------------------------------------------------------


@dataclass
class KMeansState:
    centroids: torch.Tensor  # float32 [K, D]
    counts: torch.Tensor  # float64 [K]: points ever assigned (sets the per-centroid learning rate 1/count)
    generator: torch.Generator  # the one source of randomness: init sample, k-means++, epoch permutations
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)


def apply_step(state: KMeansState, stats: StepStats, hits: torch.Tensor, metric: str) -> None:
    """Move each centroid with points in the mini-batch toward their mean, by rate (its batch count) /
    (its count ever), i.e. to the running mean of all points ever assigned to it. hits int64 [K] += counts."""
    ids, b = stats.ids, stats.counts
    hits[ids] += b
    state.counts[ids] += b.double()
    lr = (b.double() / state.counts[ids]).unsqueeze(1)
    c = state.centroids[ids].double()
    c += lr * (stats.sums / b.double().unsqueeze(1) - c)
    state.centroids[ids] = (_unit(c) if metric == "ip" else c).float()


def reseed_empty(state: KMeansState, hits: torch.Tensor, last: StepStats) -> int:
    """Move centroids that got no point this epoch onto the farthest points of the epoch's last mini-batch.

    Returns how many centroids were empty."""
    empty = torch.nonzero(hits == 0).flatten()
    take = min(empty.numel(), last.cand_rows.shape[0])
    if take:
        state.centroids[empty[:take]] = last.cand_rows[:take]
        used = state.counts > 0
        state.counts[empty[:take]] = float(state.counts[used].min()) if used.any() else 1.0
    return int(empty.numel())


# ---- data layouts ---------------------------------------------------------------------------------------


class FitData(Protocol):
    """The fit points, float32 [n, D] indexed 0..n-1 (unit rows for ``metric="ip"``), wherever they live, and how
    steps assign them: ``exact`` nearest centroids, or the float32 top-1 (see the module docstring)."""

    n: int
    dim: int
    exact: bool

    def fast_method(self, stored: str | None) -> str:
        """Fix the backend of the float32 top-1 search for the rest of the fit and return it
        ("faiss" | "torch"): the configured one, else ``stored`` (a resumed fit's), else
        :func:`kmim.tokenizers.assign.fast_method`."""

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [len(idx), D]: the points at global indices idx."""

    def start_epoch(self, order: torch.Tensor) -> None:
        """order int64 [n]: the epoch's permutation; mini-batch s holds order[s * batch : (s + 1) * batch]."""

    def step(self, centroids: torch.Tensor, start: int, stop: int, candidates: int) -> StepStats:
        """Merged statistics of the points at positions [start, stop) of the epoch's order."""

    def evaluate(self, centroids: torch.Tensor, chunk: int) -> tuple[float, torch.Tensor]:
        """(total cost, used bool [K]) over all points."""


FAST_METHODS = ("faiss", "torch")


class Partition:
    """The points with global indices [offset, offset + len(x)): float32 [n, D], on the CPU; unit-normalized
    here for ``metric="ip"`` (spherical k-means). Steps and the final pass assign them on ``device`` with
    backend ``method``, exactly or (``exact=False``) by the float32 top-1."""

    def __init__(self, x: torch.Tensor, offset: int, *, metric: str, method: str,
                 device: str | torch.device = "cpu", exact: bool = True) -> None:
        x = x.float().contiguous()
        self.x = _unit(x) if metric == "ip" else x
        # float64 [n]: the steps' costs come from them (summed_cost); widened a cacheful at a time, not one float64
        # copy of x (0.09 s -> 0.02 s for the CIFAR patches)
        with torch_threads(1):  # a row of over 32k elements would be summed in parts by several threads
            self.sq = torch.cat([(x64 ** 2).sum(1) for _, x64 in widened(self.x, None)])
        self.offset, self.metric, self.method, self.device, self.exact = offset, metric, method, device, exact
        self.threads = torch.get_num_threads()  # of the searches not on faiss
        self.scratch = Scratch()
        self._pos = self._rows = torch.zeros(0, dtype=torch.int64)

    def fast_method(self, stored: str | None) -> str:
        if torch.device(self.device).type == "cuda":
            self.method = "torch"
        elif self.method not in FAST_METHODS:
            self.method = stored if stored in FAST_METHODS else fast_method(self.device)
        return self.method

    def rows(self, local_idx: torch.Tensor) -> torch.Tensor:
        return self.x[local_idx]

    def start_epoch(self, order: torch.Tensor) -> None:
        """Sort this partition's points by their position in the epoch's global order."""
        if self.offset == 0 and self.x.shape[0] == order.numel():  # all the points: their order is the epoch's
            self._pos, self._rows = torch.arange(order.numel()), order
            return
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel())
        self._pos, self._rows = position[self.offset:self.offset + self.x.shape[0]].sort()

    def _assign(self, xb: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """int64 [b] on the CPU: the centroid of each row of xb [b, D], searched on this partition's device.

        The search runs on this partition's threads (faiss's or torch's), everything else in the fit on one torch
        thread. Why: torch's OpenMP workers spin-wait after each op, and faiss's (a second OpenMP runtime) after
        each search; small torch ops on all threads between searches left the two runtimes fighting for the
        cores: 3 epochs of the CIFAR fit took 26 s instead of 2.4 s on a loaded 2-core machine.
        """
        if not xb.shape[0]:  # a partition may hold no point of a mini-batch
            return torch.zeros(0, dtype=torch.int64)
        if self.method not in FAST_METHODS:  # exact: either backend gives the same; time them once
            with torch_threads(self.threads):
                self.method = exact_method(xb.to(self.device), centroids.to(self.device), self.metric, self.threads)
        with torch_threads(1 if self.method == "faiss" else self.threads):
            return nearest(xb.to(self.device), centroids.to(self.device), metric=self.metric, method=self.method,
                           exact=self.exact, threads=self.threads)[0].cpu()

    def step(self, centroids: torch.Tensor, start: int, stop: int, candidates: int) -> StepStats:
        with torch_threads(1):
            lo, hi = (int(torch.searchsorted(self._pos, v)) for v in (start, stop))
            rows = self._rows[lo:hi]
            b, d = rows.numel(), self.x.shape[1]
            xb = torch.index_select(self.x, 0, rows, out=self.scratch.get("x", b, d, torch.float32))
            return batch_stats(xb, self._pos[lo:hi] - start, self._assign(xb, centroids), centroids,
                               sq=self.sq.index_select(0, rows), metric=self.metric, candidates=candidates,
                               scratch=self.scratch)

    def evaluate(self, centroids: torch.Tensor, chunk: int) -> tuple[float, torch.Tensor]:
        total, used = 0.0, torch.zeros(centroids.shape[0], dtype=torch.bool)
        with torch_threads(1):
            for start in range(0, self.x.shape[0], chunk):
                xb = self.x[start:start + chunk]
                idx = self._assign(xb, centroids)
                total += float(point_cost(xb, centroids, idx, self.metric, self.scratch).sum())
                used[idx] = True
        return total, used


class LocalData:
    """All points in this process: one :class:`Partition` (points on the CPU, assignment on ``device``)."""

    def __init__(self, x: torch.Tensor, *, metric: str, method: str, device: str | torch.device = "cpu",
                 exact: bool = True) -> None:
        self.part = Partition(x, 0, metric=metric, method=method, device=device, exact=exact)
        self.n, self.dim = x.shape
        self.exact = exact

    def fast_method(self, stored: str | None) -> str:
        return self.part.fast_method(stored)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.part.rows(idx)

    def start_epoch(self, order: torch.Tensor) -> None:
        self.part.start_epoch(order)

    def step(self, centroids: torch.Tensor, start: int, stop: int, candidates: int) -> StepStats:
        # One share is its own merge: merge_stats would return the same statistics.
        return self.part.step(centroids, start, stop, candidates)

    def evaluate(self, centroids: torch.Tensor, chunk: int) -> tuple[float, torch.Tensor]:
        return self.part.evaluate(centroids, chunk)


# ---- checkpoints ----------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, state: KMeansState, settings: dict) -> None:
    """One safetensors file (centroids, counts, generator state; epoch, history and settings as JSON
    metadata), written to a temporary name and renamed, so a crash leaves the previous epoch's file."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": _CHECKPOINT_FORMAT, "epoch": state.epoch, "history": state.history, "settings": settings}
    tensors = {"centroids": state.centroids.contiguous(), "counts": state.counts.contiguous(),
               "generator": state.generator.get_state()}
    atomic_write(directory / CHECKPOINT,
                 lambda tmp: save_file(tensors, str(tmp), metadata={"kmim-kmeans": json.dumps(meta, sort_keys=True)}))


def _checkpoint_meta(path: Path) -> dict | None:
    """The JSON metadata of the checkpoint file at ``path`` (format, epoch, history, settings), None without one."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("kmim-kmeans", "{}"))


def load_checkpoint(directory: Path, settings: dict, epochs: int) -> KMeansState | None:
    """The saved state if it was made with exactly these settings (and data) and at most ``epochs`` epochs;
    otherwise None, with a warning naming what differs: a checkpoint is never reused for another fit."""
    path = directory / CHECKPOINT
    meta = _checkpoint_meta(path)
    if meta is None:
        return None
    old = meta.get("settings", {})
    differs = sorted(key for key in {*old, *settings} if old.get(key) != settings.get(key))
    if meta.get("format") != _CHECKPOINT_FORMAT or differs or meta.get("epoch", 0) > epochs:
        why = f"other {', '.join(differs)}" if differs else f"epoch {meta.get('epoch')} > {epochs} or other format"
        logger.warning("ignoring k-means checkpoint %s (%s); fitting from scratch", path, why)
        return None
    tensors = load_file(str(path))
    gen = torch.Generator()
    gen.set_state(tensors["generator"])
    return KMeansState(tensors["centroids"], tensors["counts"], gen, meta["epoch"], meta["history"])


# ---- the loop -------------------------------------------------------------------------------------------


def _init_state(data: FitData, k: int, seed: int, init_size: int, metric: str,
                device: str | torch.device) -> KMeansState:
    gen = torch.Generator().manual_seed(seed)
    init_idx = torch.randperm(data.n, generator=gen)[:init_size]
    centroids = kmeans_plus_plus(data.rows(init_idx).to(device), k, gen).cpu()
    return KMeansState(_unit(centroids) if metric == "ip" else centroids, torch.zeros(k, dtype=torch.float64), gen)


def _run_epoch(data: FitData, state: KMeansState, batch_size: int, metric: str) -> dict:
    """One pass over every point in the epoch's shuffled mini-batches, then reseeding; returns its stats."""
    k = state.centroids.shape[0]
    data.start_epoch(torch.randperm(data.n, generator=state.generator))
    hits = torch.zeros(k, dtype=torch.int64)
    total = 0.0
    starts = range(0, data.n, batch_size)
    for start in starts:
        # Only the last mini-batch's farthest points can re-seed; at most the centroids still empty need one.
        candidates = int((hits == 0).sum()) if start == starts[-1] else 0
        stats = data.step(state.centroids, start, min(start + batch_size, data.n), candidates)
        total += stats.cost
        apply_step(state, stats, hits, metric)
    reseeded = reseed_empty(state, hits, stats)
    state.epoch += 1
    return {"epoch": state.epoch, "inertia": total / data.n, "utilization": float((hits > 0).float().mean()),
            "reseeded": reseeded}


def run_minibatch(data: FitData, k: int, *, epochs: int, batch_size: int, seed: int, metric: str = "l2",
                  init_size: int | None = None, checkpoint: Path | None = None, data_digest: str | None = None,
                  log_epoch: Callable[[dict], None] | None = None, device: str | torch.device = "cpu") -> KMeansResult:
    """Fit K centroids to the points of ``data`` (see the module docstring); resumable from ``checkpoint``.

    ``data_digest`` identifies the points for the checkpoint (required with ``checkpoint``). ``device`` is
    where this process runs k-means++ (see :func:`kmeans_plus_plus`); ``data`` assigns on its own devices.
    """
    if data.n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {data.n}")
    # k-means++ candidates: 20 per centroid, at least 16,384 in the exact fit (as always), 4,096 in the fast one:
    # for K=50 on the demo's 36k 768-d pixel patches, 4,096 fitted as well (inertia 20.80, 20.95, 21.03 for seeds
    # 0-2, vs 21.10, 21.41, 21.04) and seeded 0.6 s sooner; K=1024 needs its 20,480 (10,240: 0.6% worse).
    init_size = min(data.n, init_size or max(20 * k, 16384 if data.exact else 4096))
    settings = {"k": k, "batch_size": batch_size, "seed": seed, "metric": metric, "init_size": init_size,
                "points": data.n, "dim": data.dim, "data": data_digest}
    if checkpoint is not None and data_digest is None:
        raise ValueError("a k-means checkpoint needs a data digest")
    assign = "exact"
    if not data.exact:  # the fast fit resumes only on the backend it ran on (an exact one records none)
        saved = (_checkpoint_meta(checkpoint / CHECKPOINT) or {}) if checkpoint is not None else {}
        assign = settings["assign"] = data.fast_method(saved.get("settings", {}).get("assign"))
    state = load_checkpoint(checkpoint, settings, epochs) if checkpoint is not None else None
    if state is None:
        state = _init_state(data, k, seed, init_size, metric, device)
    elif state.epoch:
        logger.info("k-means: resuming after epoch %d from %s", state.epoch, checkpoint)
    with torch_threads(1):  # the updates: small ops between searches (see Partition._assign)
        while state.epoch < epochs:
            stats = _run_epoch(data, state, batch_size, metric)
            state.history.append(stats)
            if checkpoint is not None:
                save_checkpoint(checkpoint, state, settings)
            if log_epoch is not None:
                log_epoch(stats)
    inertia, used = data.evaluate(state.centroids, batch_size)
    return KMeansResult(state.centroids, inertia, float(used.float().mean()), state.history, assign)


def fit_kmeans(x: torch.Tensor, k: int, *, epochs: int, batch_size: int, seed: int, metric: str = "l2",
               method: str = "auto", init_size: int | None = None, checkpoint: Path | None = None,
               data_digest: str | None = None, log: Callable[[dict], None] | None = None,
               device: str | torch.device | None = None, exact: bool = True) -> KMeansResult:
    """Fit K centroids to x float32 [N, D] (on the CPU) in this process with mini-batch k-means.

    Each epoch visits every point once in shuffled mini-batches; centroid j moves to the running mean
    of all points ever assigned to it (per-centroid learning rate 1/count). Centroids that got no point
    in an epoch are re-seeded to the farthest points of the epoch's last batch. Assignments are exact
    nearest centroids, so the fit does not depend on which search backend ran; with ``exact=False``, the
    float32 top-1 of one backend (``method``, else :func:`kmim.tokenizers.assign.fast_method`), see the module
    docstring. With ``checkpoint`` (a directory), the state is saved every epoch and resumed from; ``data_digest``
    defaults to the digest of x.

    ``device`` (default: CUDA when available, else the CPU) runs k-means++ and the assignments; sums,
    costs and centroid updates stay in float64 on the CPU. Assignments are exact and k-means++ agrees
    across devices up to float64 rounding, so the device does not change the fit beyond that either.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if checkpoint is not None and data_digest is None:
        data_digest = points_digest([part_digest(x.float().numpy())])
    return run_minibatch(LocalData(x, metric=metric, method=method, device=device, exact=exact), k, epochs=epochs,
                         batch_size=batch_size, seed=seed, metric=metric, init_size=init_size, checkpoint=checkpoint,
                         data_digest=data_digest, log_epoch=log, device=device)
