"""Mini-batch K-means (Sculley 2010) with greedy k-means++ initialization.

Deterministic for a seed: every random draw comes from one seeded ``torch.Generator`` and batches are
a seeded permutation per epoch. ``metric="ip"`` is spherical k-means (unit-norm centroids, assignment
by maximum inner product) for L2-normalized features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kmim.tokenizers.assign import nearest


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # float32 [K, D]
    inertia: float  # sum over the fit sample of squared distance (l2) or 1 - cosine (ip) to the nearest centroid
    utilization: float  # fraction of centroids nearest to at least one sample point
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, inertia (mean per point), utilization


def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: each step samples 2 + ln(k) candidates by D^2 and keeps the best one. [K, D]."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)

    def sq_dist(rows: torch.Tensor) -> torch.Tensor:  # [len(rows), N]
        return (x_sq[rows, None] - 2 * x[rows] @ x.T + x_sq).clamp_min_(0)

    first = torch.randint(n, (1,), generator=gen)
    chosen = [first]
    closest = sq_dist(first)[0]
    for _ in range(1, k):
        pot = closest.sum()
        if pot <= 0:  # fewer distinct points than k: fill with random points
            idx = torch.randint(n, (1,), generator=gen)
        else:
            r = torch.rand(trials, generator=gen, dtype=torch.float64) * float(pot)
            idx = torch.searchsorted(torch.cumsum(closest.double(), 0), r).clamp_(max=n - 1)
        new_closest = torch.minimum(closest.unsqueeze(0), sq_dist(idx))
        best = int(new_closest.sum(1).argmin())
        closest = new_closest[best]
        chosen.append(idx[best:best + 1])
    return x[torch.cat(chosen)].clone()


def _unit(c: torch.Tensor) -> torch.Tensor:
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_kmeans(x: torch.Tensor, k: int, *, epochs: int, batch_size: int, seed: int, metric: str = "l2",
               method: str = "auto", init_size: int | None = None,
               log: Callable[[dict], None] | None = None) -> KMeansResult:
    """Fit K centroids to x float32 [N, D] with mini-batch k-means.

    Each epoch visits every point once in shuffled mini-batches; centroid j moves to the running mean
    of all points ever assigned to it (per-centroid learning rate 1/count). Centroids that got no point
    in an epoch are re-seeded to the farthest points of the epoch's last batch. Assignments are exact
    nearest centroids, so the fit does not depend on which search backend ran.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    x = x.float().contiguous()
    if metric == "ip":
        x = _unit(x)
    n = x.shape[0]
    init_size = min(n, init_size or max(20 * k, 16384))
    init_idx = torch.randperm(n, generator=gen)[:init_size]
    centroids = kmeans_plus_plus(x[init_idx], k, gen)
    if metric == "ip":
        centroids = _unit(centroids)
    counts = torch.zeros(k, dtype=torch.float64)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        hits = torch.zeros(k, dtype=torch.int64)
        total = 0.0
        for start in range(0, n, batch_size):
            xb = x[order[start:start + batch_size]]
            idx, score = nearest(xb, centroids, metric=metric, method=method)
            total += float(score.double().sum()) + (xb.shape[0] if metric == "ip" else 0)
            b = torch.bincount(idx, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, idx, xb)
            hits += b
            counts += b
            moved = b > 0
            lr = (b[moved] / counts[moved]).float().unsqueeze(1)
            centroids[moved] += lr * (sums[moved] / b[moved].unsqueeze(1).float() - centroids[moved])
            if metric == "ip":
                centroids[moved] = _unit(centroids[moved])
        empty = torch.nonzero(hits == 0).flatten()
        if empty.numel():
            far = torch.argsort(score, descending=True, stable=True)[: empty.numel()]
            centroids[empty[: far.numel()]] = xb[far]
            counts[empty[: far.numel()]] = float(counts[counts > 0].min()) if (counts > 0).any() else 1.0
        stats = {"epoch": epoch + 1, "inertia": total / n, "utilization": float((hits > 0).float().mean()),
                 "reseeded": int(empty.numel())}
        history.append(stats)
        if log is not None:
            log(stats)
    inertia, used = 0.0, torch.zeros(k, dtype=torch.bool)
    for start in range(0, n, batch_size):
        idx, score = nearest(x[start:start + batch_size], centroids, metric=metric, method=method)
        inertia += float(score.double().sum()) + (idx.numel() if metric == "ip" else 0)
        used[idx] = True
    return KMeansResult(centroids, inertia, float(used.float().mean()), history)
