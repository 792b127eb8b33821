"""Nearest-centroid search: faiss or a torch GEMM (whichever measures faster), made exact.

Both backends compute ``|x|^2 - 2 x.c + |c|^2`` in float32, which can swap two nearly equidistant
centroids. ``nearest(..., exact=True)`` bounds that rounding error per row and recomputes every row whose two
best candidates are closer than twice the bound: first by a float64 GEMM (cheap), then, for the rare
rows still within float64's bound, by direct float64 differences; the result is then exactly the
brute-force argmin (lowest index on ties).
"""

from __future__ import annotations

import os
import time
from functools import cache

import numpy as np
import torch

_ROUNDOFF = 2.0**-24  # float32 unit roundoff
_GEMM_ELEMS = 1 << 25  # rows x K per GEMM chunk (128 MiB of float32 distances)
_EXACT_ELEMS = 1 << 24  # rows x K x D per float64 recompute block
_choice: dict[tuple, str] = {}


@cache
def _faiss():
    # faiss-cpu's bundled OpenBLAS misdetects some AVX-512 CPUs and picks slow kernels; it reads this
    # variable when the library loads, so it must be set before the first import.
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = " avx512f" in f.read()
    except OSError:
        avx512 = False
    if avx512:
        os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
    import faiss

    return faiss


def _scores_torch(x: torch.Tensor, c: torch.Tensor, metric: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n (score [N, n], index [N, n]) per row; score = squared distance (l2) or negated dot (ip)."""
    c_sq = (c * c).sum(1) if metric == "l2" else None
    step = max(1, _GEMM_ELEMS // c.shape[0])
    vals, idxs = [], []
    for start in range(0, x.shape[0], step):
        xb = x[start:start + step]
        s = -(xb @ c.T)
        if metric == "l2":
            s = s.mul_(2).add_(c_sq).add_((xb * xb).sum(1, keepdim=True))
        if n == 1:
            v, i = s.min(dim=1, keepdim=True)
        else:
            v, i = torch.topk(s, n, dim=1, largest=False, sorted=True)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)


def _scores_faiss(x: torch.Tensor, c: torch.Tensor, metric: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = _faiss()
    index = faiss.IndexFlatL2(c.shape[1]) if metric == "l2" else faiss.IndexFlatIP(c.shape[1])
    index.add(np.ascontiguousarray(c.cpu().numpy(), dtype=np.float32))
    d, i = index.search(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32), n)
    d, i = torch.from_numpy(d), torch.from_numpy(i)
    return (d if metric == "l2" else -d), i


def _pick_method(x: torch.Tensor, c: torch.Tensor, metric: str) -> str:
    if x.is_cuda:
        return "torch"
    key = (c.shape[0], c.shape[1], metric)
    if key not in _choice:
        probe = x[: min(x.shape[0], 8192)]
        timings = {}
        for method, fn in (("torch", _scores_torch), ("faiss", _scores_faiss)):
            fn(probe, c, metric, 2)  # warm-up
            t0 = time.perf_counter()
            fn(probe, c, metric, 2)
            timings[method] = time.perf_counter() - t0
        _choice[key] = min(timings, key=timings.get)
    return _choice[key]


def _exact(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64 by direct per-pair reduction (no GEMM, whose rounding depends on blocking):
    score and argmin (first index on ties) over all centroids."""
    x64, c64 = x.double()[:, None, :], c.double()[None]
    step = max(1, _EXACT_ELEMS // max(1, x.shape[0] * c.shape[1]))
    if metric == "ip":
        parts = [-(x64 * c64[:, i:i + step]).sum(-1) for i in range(0, c.shape[0], step)]
    else:
        parts = [((x64 - c64[:, i:i + step]) ** 2).sum(-1) for i in range(0, c.shape[0], step)]
    v, i = torch.cat(parts, dim=1).min(dim=1)
    return v.float(), i


def _gamma(d: int, roundoff: float) -> float:
    """Higham's gamma_{d+4}: relative error bound of a length-d dot product plus the norm terms."""
    return (d + 4) * roundoff / (1 - (d + 4) * roundoff)


def _bound(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """Per row, the magnitude that scales every score's rounding error [N]."""
    x_norm, c_max = x.norm(dim=1), c.norm(dim=1).max()
    return (x_norm + c_max) ** 2 if metric == "l2" else x_norm * c_max


def _refine(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (score, argmin) for rows the float32 search could not separate.

    A float64 GEMM settles nearly all of them; a row whose float64 gap is still within the bound of
    both float64 computations (GEMM and direct) goes to the direct per-pair reduction.
    """
    x64, c64 = x.double(), c.double()
    s = -(x64 @ c64.T)
    if metric == "l2":
        s = s.mul_(2).add_((c64 * c64).sum(1)).add_((x64 * x64).sum(1, keepdim=True))
    vals, idxs = torch.topk(s, 2, dim=1, largest=False, sorted=True)
    score, best = vals[:, 0].float(), idxs[:, 0].clone()
    err = _gamma(c.shape[1], 2.0**-53) * _bound(x64, c64, metric)
    unsure = torch.nonzero(vals[:, 1] - vals[:, 0] <= 4 * err * 1.01).flatten()
    if unsure.numel():
        score[unsure], best[unsure] = _exact(x[unsure], c, metric)
    return score, best


def nearest(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2", method: str = "auto",
            exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid for each row.

    x float32 [N, D]; centroids float32 [K, D] (K >= 2). Returns (index int64 [N], score float32 [N]),
    score = squared Euclidean distance (``metric="l2"``) or negated inner product (``metric="ip"``).
    ``method`` is "faiss", "torch" or "auto" (time both once per shape and keep the faster).
    """
    x, c = x.float().contiguous(), centroids.float().contiguous().to(x.device)
    if method == "auto":
        method = _pick_method(x, c, metric)
    fn = _scores_faiss if method == "faiss" else _scores_torch
    vals, idxs = fn(x, c, metric, 2 if exact else 1)
    vals, idxs = vals.to(x.device), idxs.to(x.device)
    best, score = idxs[:, 0].clone(), vals[:, 0].clone()
    if not exact:
        return best, score
    # Worst-case float32 error of each computed score is gamma * bound_i.
    err = _gamma(c.shape[1], _ROUNDOFF) * _bound(x, c, metric)
    unsure = torch.nonzero(vals[:, 1] - vals[:, 0] <= 2 * err * 1.01).flatten()
    if unsure.numel():
        score[unsure], best[unsure] = _refine(x[unsure], c, metric)
    return best, score
