"""Distributed k-means on CIFAR pixel patches (image 32, patch 4 -> 48-d, K=1024): in-process vs Ray actors.

The same algorithm from the same seed in every case: ``fit_kmeans`` in this process, and
``fit_kmeans_ray`` with 1 and 2 actors, the points split into ``--chunks`` object-store chunks (as the
job's per-shard fit features would be). Fit time includes starting the actors and loading their points;
inertia is the fit's own final pass (exact nearest centroid over all patches). Prints one JSON line per
run and a summary line with the ratios vs the in-process fit.

    .venv/bin/python benchmarks/kmeans_distributed.py [--epochs 10] [--k 1024] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import logging
import time

import ray
import torch
from common import cifar_patches, emit, machine

from kmim.pipeline.fit import fit_kmeans_ray
from kmim.pipeline.runners import init_ray_on_loopback
from kmim.tokenizers.kmeans import fit_kmeans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunks", type=int, default=16, help="object-store chunks the points are split into")
    args = ap.parse_args()
    x, images = cifar_patches()
    n, d = x.shape
    common = {"bench": "kmeans_distributed", "points": n, "dim": d, "k": args.k, "epochs": args.epochs,
              "batch_size": args.batch_size, "images": images}

    t = time.perf_counter()
    local = fit_kmeans(x, args.k, epochs=args.epochs, batch_size=args.batch_size, seed=0)
    results = {"in-process": (time.perf_counter() - t, local)}

    init_ray_on_loopback(logging_level=logging.WARNING, log_to_driver=False)
    refs = [ray.put(part.numpy()) for part in torch.tensor_split(x, args.chunks)]
    for workers in args.workers:
        t = time.perf_counter()
        r = fit_kmeans_ray(refs, args.k, workers=workers, epochs=args.epochs, batch_size=args.batch_size, seed=0)
        results[f"ray-{workers}"] = (time.perf_counter() - t, r)

    for name, (seconds, r) in results.items():
        emit(**common, method=name, seconds=round(seconds, 2), inertia=r.inertia, inertia_per_patch=r.inertia / n,
             max_centroid_diff_vs_in_process=float((r.centroids - local.centroids).abs().max()))
    base_t, base = results["in-process"]
    emit(bench="kmeans_distributed", summary=True, machine=machine(), **{
        f"time_ratio_{name}": round(s / base_t, 2) for name, (s, _) in results.items() if name != "in-process"},
        **{f"inertia_ratio_{name}": round(r.inertia / base.inertia, 6)
           for name, (_, r) in results.items() if name != "in-process"})
    ray.shutdown()


if __name__ == "__main__":
    main()
