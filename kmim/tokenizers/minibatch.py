"""One mini-batch step's statistics, shared by every data layout of the k-means fit (:mod:`kmim.tokenizers.kmeans`):
per-centroid float64 sums and counts of the points each share of a mini-batch assigns (:func:`batch_stats`), their
reduction over shares (:func:`merge_stats`), and the costs of points to their centroids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepStats:
    """Per-centroid statistics of the points of one mini-batch (or of one partition's share of it)."""

    ids: torch.Tensor  # int64 [m], ascending: the centroids nearest to at least one point
    sums: torch.Tensor  # float64 [m, D]: sum of the points nearest to each
    counts: torch.Tensor  # int64 [m]: number of those points
    cost: float  # sum over the points of the cost (squared distance, or 1 - cosine) to the nearest centroid
    cand_cost: torch.Tensor  # float64 [c]: reseeding candidates, highest cost first (ties: lowest position)
    cand_pos: torch.Tensor  # int64 [c]: their positions in the mini-batch
    cand_rows: torch.Tensor  # float32 [c, D]: the candidate points


class Scratch:
    """Work buffers reused across mini-batches: a fresh large tensor costs more in page faults than its arithmetic
    (a float64 copy of an 8192 x 768 mini-batch took 16 ms fresh and 3 ms reused, on one thread)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, cols] tensor of ``dtype`` (contents undefined), the same memory for the same name when it fits."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(rows, cols, dtype=dtype)
        return buf[:rows]


# Rows are widened to float64 this many elements at a time (512 KiB, in cache) and used at once: a whole 8,192-row
# mini-batch widened first, then summed, streamed through memory 3x slower at d=768 (9.5 vs 3.1 ms) and 1.3x at
# d=48. Rows stay in order, so the sums and costs are bit for bit those of the whole batch.
WIDEN_ELEMS = 1 << 16


def widened(x: torch.Tensor, scratch: Scratch | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, x[rows] in float64) for consecutive runs of rows of x [N, D], in ``scratch`` when given."""
    n, d = x.shape
    step = max(1, WIDEN_ELEMS // max(d, 1))
    for lo in range(0, n, step):
        rows = slice(lo, min(lo + step, n))
        part = x[rows]
        yield rows, (part.double() if scratch is None else
                     scratch.get("x64", part.shape[0], d, torch.float64).copy_(part))


def point_cost(x: torch.Tensor, centroids: torch.Tensor, idx: torch.Tensor, metric: str,
               scratch: Scratch | None = None) -> torch.Tensor:
    """float64 [N]: cost of each row of x [N, D] to centroid idx [N], by direct difference (not a GEMM), so a
    point's cost does not depend on which other points share its batch; in ``scratch``'s buffers when given."""
    c64, cost = centroids.double(), torch.empty(x.shape[0], dtype=torch.float64)
    for rows, x64 in widened(x, scratch):
        c = c64[idx[rows]] if scratch is None else torch.index_select(
            c64, 0, idx[rows], out=scratch.get("cost_c", x64.shape[0], x64.shape[1], torch.float64))
        cost[rows] = 1.0 - x64.mul_(c).sum(1) if metric == "ip" else x64.sub_(c).square_().sum(1)
    return cost


def farthest(cost: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest costs, highest first; equal costs ordered by ascending position."""
    by_pos = torch.argsort(pos, stable=True)
    return by_pos[torch.argsort(cost[by_pos], descending=True, stable=True)][:n]


def summed_cost(sq: torch.Tensor, c64: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, metric: str) -> float:
    """The summed cost of points to their centroids from their squared norms sq float64 [b], the centroids that got
    points c64 float64 [m, D], and the sums [m, D] and counts int64 [m] of their points: sum |x|^2 - 2 c.s + n |c|^2
    (l2) or sum 1 - c.s (ip): no pass over the points, no gather of their centroids."""
    dot = float((c64 * sums).sum())
    if metric == "ip":
        return sq.numel() - dot
    return float(sq.sum()) - 2 * dot + float((counts.double() * (c64 * c64).sum(1)).sum())


def batch_stats(xb: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, centroids: torch.Tensor, *, sq: torch.Tensor,
                metric: str, candidates: int, scratch: Scratch) -> StepStats:
    """Statistics of points xb float32 [b, D] with squared norms sq float64 [b], at mini-batch positions pos int64
    [b], assigned to centroids idx int64 [b] of centroids [K, D]; work buffers from ``scratch``.

    Sums and costs in float64; per-point costs only when ``candidates`` (how many reseeding candidates to keep: the
    farthest points) is not 0.
    """
    # Dense over K, then the centroids that got points: cheaper than torch.unique's sort at K <= ~64k.
    counts = torch.bincount(idx, minlength=centroids.shape[0])
    ids = torch.nonzero(counts).flatten()
    sums = torch.zeros(centroids.shape[0], xb.shape[1], dtype=torch.float64)
    for rows, x64 in widened(xb, scratch):
        sums.index_add_(0, idx[rows], x64)
    sums, counts = sums[ids], counts[ids]
    cost = summed_cost(sq, centroids[ids].double(), sums, counts, metric)
    if not candidates:
        none = torch.zeros(0, dtype=torch.int64)
        return StepStats(ids, sums, counts, cost, none.double(), none, xb[none])
    point = point_cost(xb, centroids, idx, metric, scratch)
    top = farthest(point, pos, candidates)
    return StepStats(ids, sums, counts, cost, point[top], pos[top], xb[top])


def merge_stats(parts: Sequence[StepStats], candidates: int) -> StepStats:
    """Reduce the statistics of disjoint shares of one mini-batch (in partition order)."""
    ids, inverse = torch.unique(torch.cat([p.ids for p in parts]), sorted=True, return_inverse=True)
    dim = parts[0].sums.shape[1]
    sums = torch.zeros(ids.numel(), dim, dtype=torch.float64).index_add_(0, inverse, torch.cat([p.sums for p in parts]))
    counts = torch.zeros(ids.numel(), dtype=torch.int64).index_add_(0, inverse, torch.cat([p.counts for p in parts]))
    cost, pos = torch.cat([p.cand_cost for p in parts]), torch.cat([p.cand_pos for p in parts])
    top = farthest(cost, pos, candidates)
    return StepStats(ids, sums, counts, sum(p.cost for p in parts), cost[top], pos[top],
                     torch.cat([p.cand_rows for p in parts])[top])
