"""Nearest-centroid search is exactly brute force; k-means is deterministic and sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kmim.tokenizers.assign import nearest
from kmim.tokenizers.kmeans import fit_kmeans, kmeans_plus_plus


def brute_force(x: torch.Tensor, c: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    x64, c64 = x.double()[:, None, :], c.double()[None]
    if metric == "ip":
        return (-(x64 * c64).sum(-1)).argmin(1)
    return ((x64 - c64) ** 2).sum(-1).argmin(1)


@pytest.mark.parametrize("method", ["torch", "faiss", "auto"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_assignment_equals_brute_force_with_near_ties(method: str, metric: str) -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.randn(64, 48, generator=g) * 3 + 10  # large offset: float32 GEMM expansion loses digits
    x = torch.randn(3000, 48, generator=g) * 3 + 10
    # Points almost exactly halfway between two centroids, and points equal to a centroid.
    a, b = c[torch.randint(64, (500,), generator=g)], c[torch.randint(64, (500,), generator=g)]
    mid = (a + b) / 2 + torch.randn(500, 48, generator=g) * 1e-5
    x = torch.cat([x, mid, c[:20]])
    c = torch.cat([c, c[:3]])  # duplicate centroids: ties must go to the lowest index
    idx, _ = nearest(x, c, metric=metric, method=method)
    ref = brute_force(x, c, metric)
    assert torch.equal(idx, ref)


def test_inexact_mode_differs_only_on_near_ties() -> None:
    g = torch.Generator().manual_seed(1)
    c = torch.randn(32, 16, generator=g)
    x = torch.randn(2000, 16, generator=g)
    fast, _ = nearest(x, c, exact=False, method="torch")
    assert (fast == brute_force(x, c)).float().mean() > 0.99


def test_kmeans_plus_plus_picks_distinct_spread_points() -> None:
    blobs = torch.cat([torch.randn(200, 2) * 0.01 + torch.tensor(p) for p in ([0, 0], [10, 0], [0, 10], [10, 10])])
    c = kmeans_plus_plus(blobs, 4, torch.Generator().manual_seed(0))
    corners = torch.tensor([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=torch.float32)
    assert sorted(brute_force(c, corners).tolist()) == [0, 1, 2, 3]


def test_kmeans_deterministic_and_recovers_blobs() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (8, 5))
    x = torch.from_numpy((centers[rng.integers(8, size=4000)] + rng.normal(0, 0.3, (4000, 5))).astype(np.float32))
    logs: list[dict] = []
    r1 = fit_kmeans(x, 8, epochs=5, batch_size=512, seed=3, log=logs.append)
    r2 = fit_kmeans(x, 8, epochs=5, batch_size=512, seed=3)
    assert torch.equal(r1.centroids, r2.centroids)
    assert [s["epoch"] for s in logs] == [1, 2, 3, 4, 5] and all("inertia" in s and "utilization" in s for s in logs)
    assert r1.utilization == 1.0
    # every true center has a centroid within noise distance
    d = torch.cdist(torch.from_numpy(centers).float(), r1.centroids).min(1).values
    assert float(d.max()) < 0.5
    assert r1.inertia / 4000 < 5 * 0.3**2 * 1.5


def test_kmeans_reseeds_empty_clusters() -> None:
    # 3 distinct points but k=6 with one far outlier cluster: duplicates start empty and are re-seeded
    x = torch.cat([torch.zeros(300, 2), torch.ones(300, 2) * 5, torch.full((300, 2), 10.0)])
    x = x + torch.randn(900, 2) * 0.1
    r = fit_kmeans(x, 6, epochs=4, batch_size=128, seed=0)
    assert torch.isfinite(r.centroids).all()
    assert r.utilization > 0.5


def test_spherical_kmeans_returns_unit_centroids() -> None:
    x = torch.randn(1000, 8)
    r = fit_kmeans(x, 5, epochs=2, batch_size=200, seed=0, metric="ip")
    assert torch.allclose(r.centroids.norm(dim=1), torch.ones(5), atol=1e-5)
