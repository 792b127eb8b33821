"""Nearest-centroid search is exactly brute force; k-means is deterministic and sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kmim.tokenizers.assign import fast_method, nearest
from kmim.tokenizers.kmeans import fit_kmeans, kmeans_plus_plus
from kmim.tokenizers.minibatch import Scratch, point_cost, summed_cost


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


def mixture(n: int = 6000, d: int = 16, centers: int = 40, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    """Overlapping Gaussian clusters [n, d], all shifted by ``offset``."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2, (centers, d)) + offset
    return torch.from_numpy((means[rng.integers(centers, size=n)] + rng.normal(0, 1, (n, d))).astype(np.float32))


@pytest.mark.parametrize("method", ["faiss", "torch", "auto"])
def test_fast_fit_reaches_the_exact_fits_inertia(method: str) -> None:
    # Far from the origin the float32 expansion |x|^2 - 2 x.c + |c|^2 loses digits: near ties flip in the fast fit.
    x = mixture(offset=300.0)
    kw = {"epochs": 4, "batch_size": 1024, "seed": 0, "method": method, "init_size": 4096}  # the same seeding
    exact, fast = fit_kmeans(x, 32, **kw), fit_kmeans(x, 32, exact=False, **kw)
    assert exact.assign == "exact" and fast.assign == ("faiss" if method == "auto" else method)
    assert abs(fast.inertia - exact.inertia) <= 0.005 * exact.inertia
    # its own final pass measured the cost of its centroids, up to the near ties its float32 top-1 got wrong
    idx, _ = nearest(x, fast.centroids)
    assert fast.inertia == pytest.approx(float(((x.double() - fast.centroids.double()[idx]) ** 2).sum()), rel=1e-4)


def test_fast_fit_is_deterministic_for_a_backend() -> None:
    x = mixture(seed=1)
    a = fit_kmeans(x, 16, epochs=3, batch_size=512, seed=2, method="torch", exact=False)
    b = fit_kmeans(x, 16, epochs=3, batch_size=512, seed=2, method="torch", exact=False)
    assert torch.equal(a.centroids, b.centroids) and a.history == b.history


def test_exact_fit_is_unchanged_by_the_fast_mode() -> None:
    # the exact fit (kmim run --fit-exact) is the default of the library: one backend or the other, same bits
    x = mixture(seed=2)
    a = fit_kmeans(x, 16, epochs=3, batch_size=512, seed=2, method="torch")
    b = fit_kmeans(x, 16, epochs=3, batch_size=512, seed=2, method="faiss")
    assert torch.equal(a.centroids, b.centroids) and a.inertia == b.inertia


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_summed_cost_equals_the_per_point_costs(metric: str) -> None:
    x = mixture(500, seed=3)
    if metric == "ip":
        x = x / x.norm(dim=1, keepdim=True)
    c = x[:7].clone()
    idx, _ = nearest(x, c, metric=metric)
    ids, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    sums = torch.zeros(ids.numel(), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x.double())
    counts = torch.bincount(inverse)
    got = summed_cost((x.double() ** 2).sum(1), c[ids].double(), sums, counts, metric)
    assert got == pytest.approx(float(point_cost(x, c, idx, metric).sum()), rel=1e-10)


def test_fast_search_is_a_fixed_backend() -> None:
    # not a timing: two fits with the same settings on one machine must not differ by what a timing picked
    assert fast_method("cpu") == "faiss" and fast_method("cuda") == "torch"
    x, c = torch.randn(300, 8), torch.randn(20, 8)
    assert torch.equal(nearest(x, c, exact=False)[0], nearest(x, c, exact=False, method="faiss")[0])


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_point_costs_in_reused_buffers_are_the_fresh_ones(metric: str) -> None:
    x = mixture(500, seed=4)
    c = x[:9].clone()
    idx, _ = nearest(x, c, metric=metric)
    fresh, before = point_cost(x, c, idx, metric), x.clone()
    scratch = Scratch()
    for rows in (500, 120, 500):  # a smaller batch reuses the larger buffer
        assert torch.equal(point_cost(x[:rows], c, idx[:rows], metric, scratch), fresh[:rows])
    assert torch.equal(x, before)  # the points themselves are never written
    x64, c64 = x.double(), c.double()[idx]
    expected = ((x64 - c64) ** 2).sum(1) if metric == "l2" else 1.0 - (x64 * c64).sum(1)
    assert torch.equal(fresh, expected)  # bit for bit the out-of-place arithmetic


def test_a_split_faiss_search_rounds_like_the_whole_one() -> None:
    """Every part of a split search (>= FAISS_PART rows) takes faiss's GEMM path, as the whole search does: the
    float32 top-1 and its scores do not depend on the split."""
    x = torch.randn(4 * 1024 + 999, 48, generator=torch.Generator().manual_seed(5))
    c = torch.randn(1024, 48, generator=torch.Generator().manual_seed(6))
    whole = nearest(x, c, method="faiss", exact=False, threads=1)
    for threads in (2, 4, None):
        split = nearest(x, c, method="faiss", exact=False, threads=threads)
        assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])
