"""K-means fit on CIFAR pixel patches (image 32, patch 4 -> 48-d, K=1024): kmim vs sklearn vs faiss.

All run the same number of epochs (passes over the data) from k-means++-style seeding; kmim twice, with its
default fast assignment (float32 top-1) and with the exact one (``--fit-exact``). The final inertia of each is
measured the same way (exact nearest centroid over all patches). Prints one JSON line per method and a summary
line with the ratios to kmim's default fit.

    .venv/bin/python benchmarks/kmeans_fit.py [--epochs 10] [--k 1024]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import cifar_patches, emit, machine

from kmim.tokenizers.assign import _faiss, nearest
from kmim.tokenizers.kmeans import fit_kmeans


def inertia(x: torch.Tensor, c: torch.Tensor) -> float:
    return float(sum(nearest(x[i:i + 65536], c)[1].double().sum() for i in range(0, x.shape[0], 65536)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8192)
    args = ap.parse_args()
    x, images = cifar_patches()
    n, d = x.shape
    results = {}
    # Load faiss and its BLAS threads before any timing, so the first method does not pay for them
    # (a different K, so kmim's per-shape backend choice is still timed).
    nearest(x[:4096], x[:512])

    for name, exact in (("kmim", False), ("kmim (exact)", True)):
        t = time.perf_counter()
        r = fit_kmeans(x, args.k, epochs=args.epochs, batch_size=args.batch_size, seed=0, exact=exact)
        results[name] = (time.perf_counter() - t, r.centroids)

    faiss = _faiss()  # sets OPENBLAS_CORETYPE first where that helps
    t = time.perf_counter()
    km = faiss.Kmeans(d, args.k, niter=args.epochs, seed=0, max_points_per_centroid=n, verbose=False)
    km.train(x.numpy())
    results["faiss.Kmeans"] = (time.perf_counter() - t, torch.from_numpy(km.centroids))

    from sklearn.cluster import MiniBatchKMeans

    for bs in (1024, args.batch_size):
        t = time.perf_counter()
        mb = MiniBatchKMeans(args.k, batch_size=bs, max_iter=args.epochs, n_init=1, random_state=0,
                             max_no_improvement=None, tol=0.0).fit(x.numpy())
        results[f"sklearn.MiniBatchKMeans(batch={bs})"] = (time.perf_counter() - t,
                                                           torch.from_numpy(mb.cluster_centers_.astype(np.float32)))

    scores = {}
    for name, (seconds, c) in results.items():
        scores[name] = (seconds, inertia(x, c))
        emit(bench="kmeans_fit", method=name, seconds=round(seconds, 2), inertia=scores[name][1],
             inertia_per_patch=scores[name][1] / n, points=n, dim=d, k=args.k, epochs=args.epochs, images=images)
    base_t, base_i = scores["kmim"]
    emit(bench="kmeans_fit", summary=True, machine=machine(), load_average=round(os.getloadavg()[0], 2), **{
        f"speedup_vs_{name}": round(s / base_t, 2) for name, (s, _) in scores.items() if name != "kmim"},
        **{f"inertia_ratio_vs_{name}": round(base_i / i, 4) for name, (_, i) in scores.items() if name != "kmim"})


if __name__ == "__main__":
    main()
