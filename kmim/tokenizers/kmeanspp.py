"""Greedy k-means++ initialization (Arthur and Vassilvitskii 2007, greedy variant as in scikit-learn): each step
samples 2 + ln(k) candidates by D^2 and keeps the one that lowers the potential most.

The result depends on neither the thread count nor, beyond float64 rounding, the device.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from kmim.tokenizers.assign import ieee_fp32

# k-means++ samples of fewer points x dims run the serial float32 loop: steps of under ~1 ms of work, where it
# wins (16,384 x 256, K=128: 0.19 s, vs 0.36 s for the float64 loop on 1 thread and 0.39 s on 2, shared 2-core
# VM; 20,480 x 384, K=256: 1.0 s vs 1.4 s and 1.3 s). benchmarks/gpu_check.py measures both on a GPU node's cores.
SERIAL_ELEMS = 1 << 22
CHUNK_ELEMS = 1 << 20  # points x dims per chunk of the float64 loop on the CPU (fixed: not per thread count)


def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: each step samples 2 + ln(k) candidates by D^2 and keeps the best one. [K, D] on x's device.

    The loop is chosen by the sample's size alone, never by the device or the thread count:

    - n * D < SERIAL_ELEMS: float32 distances, single-threaded on the CPU (CUDA input is copied over).
      Its K sequential steps are small ops where intra-op fork/join costs more than the work (2.1 s vs
      22.6 s for K=1024 on 20,480 x 48 points on a busy 2-core machine), and a multi-threaded GEMM's
      rounding, hence which candidate wins, would depend on the thread count.
    - larger: float64 distances on x's device. On the CPU the points are cut into fixed chunks of
      CHUNK_ELEMS that torch's threads share (each chunk single-threaded, partial sums added in chunk
      order), so the result does not depend on the thread count; CUDA computes the same float64 sums in
      another order, so the two agree up to float64 rounding, the fit's own contract.

    Random draws come from ``gen`` (a CPU generator) either way. Float32 matmuls run in IEEE float32.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ieee_fp32():
            if x.shape[0] * x.shape[1] < SERIAL_ELEMS:
                return _kmeans_plus_plus(x.cpu(), k, gen).to(x.device)
            return _kmeans_plus_plus_f64(x, k, gen, threads)
    finally:
        torch.set_num_threads(threads)


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    # The GEMM's second operand laid out as it reads it (20% faster) and times -2: scaling by a power of two is
    # exact, so the products are -2 x.x bit for bit, without a pass over them.
    x_t = x.T.mul(-2).contiguous()

    def sq_dist(rows: torch.Tensor) -> torch.Tensor:  # [len(rows), N]: x_sq[rows] - 2 x[rows].x + x_sq, in place
        return (x[rows] @ x_t).add_(x_sq[rows, None]).add_(x_sq).clamp_min_(0)

    first = torch.randint(n, (1,), generator=gen)
    chosen = [first]
    closest = sq_dist(first)[0]
    for _ in range(1, k):
        pot = closest.sum()
        if pot <= 0:  # fewer distinct points than k: fill with random points
            idx = torch.randint(n, (1,), generator=gen)
        else:
            r = torch.rand(trials, generator=gen, dtype=torch.float64) * float(pot)
            idx = torch.searchsorted(torch.cumsum(closest, 0, dtype=torch.float64), r).clamp_(max=n - 1)
        new_closest = sq_dist(idx)
        torch.minimum(closest.unsqueeze(0), new_closest, out=new_closest)
        best = int(new_closest.sum(1).argmin())
        closest = new_closest[best]
        chosen.append(idx[best:best + 1])
    return x[torch.cat(chosen)].clone()


def _kmeans_plus_plus_f64(x: torch.Tensor, k: int, gen: torch.Generator, threads: int) -> torch.Tensor:
    """The same steps with float64 distances on x's device; CPU chunks run on ``threads`` threads."""
    n, dev = x.shape[0], x.device
    trials = 2 + int(math.log(k))
    x64 = x.double()
    x_sq = (x64 * x64).sum(1)
    step = n if x.is_cuda else max(1, CHUNK_ELEMS // x.shape[1])
    chunks = [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]
    pool = ThreadPoolExecutor(min(threads, len(chunks))) if len(chunks) > 1 and threads > 1 else None

    def candidates(idx: torch.Tensor, closest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min(closest, squared distance to each candidate) [t, N], its sum per candidate [t])."""
        xc, xc_sq = x64[idx], x_sq[idx, None]
        new = torch.empty(idx.numel(), n, dtype=torch.float64, device=dev)

        def chunk(part: slice) -> torch.Tensor:
            d = torch.addmm(x_sq[part], xc, x64[part].T, alpha=-2).add_(xc_sq).clamp_min_(0)
            return torch.minimum(closest[part], d, out=new[:, part]).sum(1)

        sums = list(pool.map(chunk, chunks) if pool else map(chunk, chunks))
        return new, functools.reduce(torch.add, sums)  # in chunk order

    try:
        first = torch.randint(n, (1,), generator=gen).to(dev)
        chosen = [first]
        closest = candidates(first, torch.full((n,), math.inf, dtype=torch.float64, device=dev))[0][0]
        for _ in range(1, k):
            cum = torch.cumsum(closest, 0)
            if cum[-1] <= 0:  # fewer distinct points than k: fill with random points
                idx = torch.randint(n, (1,), generator=gen).to(dev)
            else:
                r = torch.rand(trials, generator=gen, dtype=torch.float64).to(dev) * cum[-1]
                idx = torch.searchsorted(cum, r).clamp_(max=n - 1)
            new, pots = candidates(idx, closest)
            best = int(pots.argmin())
            closest = new[best]
            chosen.append(idx[best:best + 1])
    finally:
        if pool is not None:
            pool.shutdown()
    return x[torch.cat(chosen)].clone()
