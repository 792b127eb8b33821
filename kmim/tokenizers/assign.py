"""Nearest-centroid search: faiss or a torch GEMM (whichever measures faster), made exact.

Both backends compute ``|x|^2 - 2 x.c + |c|^2`` in float32, which can swap two nearly equidistant
centroids. ``nearest(..., exact=True)`` bounds that rounding error per row and recomputes every row whose two
best candidates are closer than twice the bound: first by a float64 GEMM (cheap), then, for the rare
rows still within float64's bound, by direct float64 differences; the result is then exactly the
brute-force argmin (lowest index on ties).

The bound holds for IEEE float32 products only: TF32 (CUDA) or bfloat16 (oneDNN on CPUs with AMX or
AVX512-BF16) matmuls, which ``torch.set_float32_matmul_precision("high"/"medium")`` or
``torch.backends.cuda.matmul.allow_tf32 = True`` switch on process-wide, would void it, so
:func:`nearest` runs under :func:`ieee_fp32`. CUDA tensors stay on their device (torch GEMM); every
intermediate is processed in chunks of bounded size.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch

_ROUNDOFF = 2.0**-24  # float32 unit roundoff
_GEMM_ELEMS = 1 << 25  # rows x K per GEMM chunk (128 MiB of float32 distances)
_REFINE_ELEMS = 1 << 24  # rows x K per float64 GEMM chunk of the refinement (128 MiB of float64 distances)
_EXACT_ELEMS = 1 << 24  # rows x centroids x D per float64 direct-difference block (128 MiB)
_choice: dict[tuple, str] = {}
# faiss searches at least this many query rows with its GEMM (faiss's long-standing default, set on every search:
# faiss 1.15's default of 128,000 sent searches of up to ~4,000 rows against 1,024 centroids to a scalar path that
# was 4x slower at d=48 and rounds differently). Fewest rows of one thread's search, FAISS_PART, is above it, so
# every row takes the same GEMM path however a search is split; it also keeps the threads' overhead small.
BLAS_ROWS = 20
FAISS_PART = 1024
# faiss's GEMM blocks (query rows x centroids): with its defaults (4096 x 1024) a block's distances take 16 MiB and
# reading them back dominates at small dimensions; 512 x 512 blocks (1 MiB, in L2) searched 18-24% faster at d=48
# (K=1024 and 8192, top-1 and top-2) and 3-5% at d=384 and 768 (benchmarks/search_blocks.py).
BLAS_BLOCKS = (512, 512)
PROBE_ROWS = 2048  # rows the exact search's backends are timed on (_pick_method)


def _precision_switches() -> list:
    """The per-backend float32 matmul precision settings (``fp32_precision``) of torch >= 2.9: cuBLAS and oneDNN."""
    switches = []
    for switch in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)):
        try:
            switch.fp32_precision  # noqa: B018 - probing: older torch raises AttributeError
        except AttributeError:
            continue
        switches.append(switch)
    return switches


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Within the block, float32 matmuls use IEEE float32 (no TF32 on CUDA, no bfloat16 on oneDNN CPUs);
    the process's settings are restored on exit.

    Sets both of torch's interfaces consistently: the legacy ``set_float32_matmul_precision`` (which also
    drives ``torch.backends.cuda.matmul.allow_tf32``) and, on torch >= 2.9, the per-backend
    ``fp32_precision`` (torch refuses mixed settings when it reads them). These are process-wide: a matmul
    another thread runs meanwhile is IEEE too, and a thread changing them meanwhile races with the restore.
    """
    switches = _precision_switches()
    saved = [s.fp32_precision for s in switches]
    for s in switches:  # all "ieee" first: the legacy getter refuses a mix of the two interfaces
        s.fp32_precision = "ieee"
    legacy = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for s, value in zip(switches, saved, strict=True):
            s.fp32_precision = value


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch on ``n`` threads within the block (the k-means fit's bookkeeping on one, see
    :meth:`kmim.tokenizers.kmeans.Partition._assign`; a split faiss search's own, see :func:`nearest`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


@functools.cache
def _search_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kmim-search")


def _search_part(index, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One faiss search on the calling thread alone. faiss and torch share torch's OpenMP runtime, whose thread
    count is per calling thread: it is restored, or torch would run on one thread in this thread from now on."""
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(x, n)
    finally:
        faiss.omp_set_num_threads(threads)


def _scores_faiss(x: torch.Tensor, c: torch.Tensor, metric: str, n: int,
                  threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n like :func:`_scores_torch`: on faiss's OpenMP threads (``threads`` None), or with the rows split over
    ``threads`` threads, each a one-thread search.

    Why split: OpenMP barriers spin-wait for every thread, so on a loaded machine a search waits for a descheduled
    thread (a CIFAR k-means fit on 2 OpenMP threads took 21 s instead of 12 s at load 3.5 on 2 cores); a thread
    here does its share and is joined without spinning. Results do not depend on the split: every part is at least
    FAISS_PART rows, so faiss computes each row by the same GEMM path.
    """
    faiss = _faiss()
    faiss.cvar.distance_compute_blas_threshold = BLAS_ROWS
    faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = BLAS_BLOCKS
    index = faiss.IndexFlatL2(c.shape[1]) if metric == "l2" else faiss.IndexFlatIP(c.shape[1])
    index.add(np.ascontiguousarray(c.cpu().numpy(), dtype=np.float32))
    rows = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    parts = 0 if threads is None else max(1, min(threads, rows.shape[0] // FAISS_PART))
    if parts <= 1:
        d, i = index.search(rows, n) if threads is None else _search_part(index, rows, n)
    else:
        found = list(_search_pool(parts).map(lambda part: _search_part(index, part, n), np.array_split(rows, parts)))
        d, i = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    d, i = torch.from_numpy(d), torch.from_numpy(i)
    return (d if metric == "l2" else -d), i


def _pick_method(x: torch.Tensor, c: torch.Tensor, metric: str, threads: int | None) -> str:
    """The faster CPU backend for the exact search (top-2) of rows like x against c (faiss on ``threads``), timed
    once per shape."""
    key = (c.shape[0], c.shape[1], metric, threads)
    if key not in _choice:
        # 2,048 rows pick as 8,192 did at d=48-768, K=1,024-8,192 (faiss on 2 cores), at a quarter of the cost
        # (0.11 s -> 0.02 s at d=48, K=1,024; 1.7 s -> 0.44 s at d=768, K=8,192: both backends run twice).
        probe = x[:PROBE_ROWS]
        timings = {}
        for method, fn in (("torch", _scores_torch), ("faiss", functools.partial(_scores_faiss, threads=threads))):
            fn(probe, c, metric, 2)  # warm-up
            t0 = time.perf_counter()
            fn(probe, c, metric, 2)
            timings[method] = time.perf_counter() - t0
        _choice[key] = min(timings, key=timings.get)
    return _choice[key]


def exact_method(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2", threads: int | None = None) -> str:
    """The backend ``nearest(..., method="auto", threads=threads)`` uses for rows like x [N, D] against centroids
    [K, D]: the torch GEMM on CUDA, else the faster of the two at this shape (timed once per shape)."""
    if x.is_cuda:
        return "torch"
    with ieee_fp32():
        return _pick_method(x.float().contiguous(), centroids.float().contiguous(), metric, threads)


def fast_method(device: str | torch.device) -> str:
    """The backend of the float32 top-1 search (``nearest(..., exact=False)``) when none is asked for: the torch
    GEMM on CUDA, faiss on the CPU. A fixed choice, not a timing like the exact search's: the top-1 of near ties
    depends on the backend, and a fit must not change with what a noisy timing picked."""
    return "torch" if torch.device(device).type == "cuda" else "faiss"


def _exact(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64 by direct per-pair reduction (no GEMM, whose rounding depends on blocking):
    score float32 [N] and argmin int64 [N] (first index on ties) over all centroids.

    Blocks of rows x centroids x D <= _EXACT_ELEMS (at least one pair); a pair's value does not depend
    on its block, and a later block takes a row only where it is strictly better (lowest index on ties).
    """
    k, d = c.shape
    cols = min(k, max(1, _EXACT_ELEMS // d))
    rows = max(1, _EXACT_ELEMS // (cols * d))
    c64 = c.double()
    best_v = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    best_i = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for r in range(0, x.shape[0], rows):
        xb, v, i = x[r:r + rows].double()[:, None, :], best_v[r:r + rows], best_i[r:r + rows]
        for j in range(0, k, cols):
            cb = c64[None, j:j + cols]
            s = -(xb * cb).sum(-1) if metric == "ip" else ((xb - cb) ** 2).sum(-1)
            block_v, block_i = s.min(dim=1)
            better = block_v < v
            v[better], i[better] = block_v[better], block_i[better] + j
    return best_v.float(), best_i


def _gamma(d: int, roundoff: float) -> float:
    """Higham's gamma_{d+4}: relative error bound of a length-d dot product plus the norm terms."""
    return (d + 4) * roundoff / (1 - (d + 4) * roundoff)


def _bound(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """Per row, the magnitude that scales every score's rounding error [N]."""
    x_norm, c_max = x.norm(dim=1), c.norm(dim=1).max()
    return (x_norm + c_max) ** 2 if metric == "l2" else x_norm * c_max


def _refine(x: torch.Tensor, c: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (score, argmin) for rows the float32 search could not separate.

    A float64 GEMM (chunks of rows x K <= _REFINE_ELEMS) settles nearly all of them; a row whose float64
    gap is still within the bound of both float64 computations (GEMM and direct) goes to the direct
    per-pair reduction.
    """
    c64 = c.double()
    c_sq = (c64 * c64).sum(1) if metric == "l2" else None
    gamma = _gamma(c.shape[1], 2.0**-53)
    step = max(1, _REFINE_ELEMS // c.shape[0])
    scores, bests, unsure = [], [], []
    for start in range(0, x.shape[0], step):
        xb = x[start:start + step].double()
        s = -(xb @ c64.T)
        if metric == "l2":
            s = s.mul_(2).add_(c_sq).add_((xb * xb).sum(1, keepdim=True))
        v, i = torch.topk(s, 2, dim=1, largest=False, sorted=True)
        scores.append(v[:, 0].float())
        bests.append(i[:, 0])
        unsure.append(v[:, 1] - v[:, 0] <= 4 * gamma * _bound(xb, c64, metric) * 1.01)
    score, best = torch.cat(scores), torch.cat(bests)
    rows = torch.nonzero(torch.cat(unsure)).flatten()
    if rows.numel():
        score[rows], best[rows] = _exact(x[rows], c, metric)
    return score, best


def nearest(x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2", method: str = "auto",
            exact: bool = True, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid for each row, on x's device.

    x float32 [N, D]; centroids float32 [K, D] (K >= 2). Returns (index int64 [N], score float32 [N]),
    score = squared Euclidean distance (``metric="l2"``) or negated inner product (``metric="ip"``).
    ``method`` is "faiss", "torch" or "auto" (time both once per shape and keep the faster); it only picks
    the CPU backend: CUDA tensors always use the torch GEMM on their device (exact tokens are the same).
    Float32 matmuls run in IEEE float32 whatever the global precision settings (see :func:`ieee_fp32`).
    ``exact=False`` is the float32 top-1 alone (no near-tie settlement): the nearest up to float32 rounding, so a
    near tie may go either way depending on the backend, the device and the thread count; its "auto" is
    :func:`fast_method`.

    ``threads``: None (the default) runs a faiss search on faiss's OpenMP threads (as many as torch's on this
    thread), a number splits it over that many threads of one-thread searches (see :func:`_scores_faiss`: robust
    on a loaded machine; the k-means fit and the tokenize stage pass their thread count). The torch GEMM uses
    torch's threads.
    """
    x, c = x.float().contiguous(), centroids.float().contiguous().to(x.device)
    with ieee_fp32():
        return _nearest(x, c, metric, method, exact, threads)


def _nearest(x: torch.Tensor, c: torch.Tensor, metric: str, method: str, exact: bool,
             threads: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = 2 if exact else 1
    if x.is_cuda:
        method = "torch"
    elif method == "auto":
        method = _pick_method(x, c, metric, threads) if exact else fast_method(x.device)
    if method != "faiss":
        return _settled(x, c, *_scores_torch(x, c, metric, n), metric, exact)
    if threads is None:
        return _settled(x, c, *_scores_faiss(x, c, metric, n, threads), metric, exact)
    # The search's threads have the cores: torch's own ops on one (on two, its OpenMP workers spin-waited after each
    # op while faiss searched: an exact search of 16k CIFAR patches took 16.5 ms instead of 13.9 ms on 2 cores).
    with torch_threads(1):
        return _settled(x, c, *_scores_faiss(x, c, metric, n, threads), metric, exact)


def _settled(x: torch.Tensor, c: torch.Tensor, vals: torch.Tensor, idxs: torch.Tensor, metric: str,
             exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, score) of the best of the top-n (vals, idxs [N, n]); ``exact``: every near tie settled exactly."""
    best, score = idxs[:, 0].clone(), vals[:, 0].clone()
    if not exact:
        return best, score
    # Worst-case float32 error of each computed score is gamma * bound_i.
    err = _gamma(c.shape[1], _ROUNDOFF) * _bound(x, c, metric)
    unsure = torch.nonzero(vals[:, 1] - vals[:, 0] <= 2 * err * 1.01).flatten()
    if unsure.numel():
        score[unsure], best[unsure] = _refine(x[unsure], c, metric)
    return best, score
