"""Distributed k-means on CIFAR pixel patches (image 32, patch 4 -> 48-d, K=1024): in-process vs Ray actors.

The same algorithm from the same seed in every case: ``fit_kmeans`` in this process, and
``fit_kmeans_ray`` with 1 and 2 actors, the points split into ``--chunks`` object-store chunks (as the
job's per-shard fit features would be). Fit time includes starting the actors and loading their points;
inertia is the fit's own final pass (nearest centroid over all patches). ``--fit-exact`` runs the exact fit
instead of the default fast one. Then the per-step overhead of the Ray fit: steps of 64 points (so next to no
search work) on warm actors against the same steps in-process, in milliseconds per step. Prints one JSON line
per run and a summary line with the ratios vs the in-process fit.

    .venv/bin/python benchmarks/kmeans_distributed.py [--epochs 10] [--k 1024] [--workers 1 2] [--fit-exact]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import ray
import torch
from common import cifar_patches, emit, machine

from kmim.pipeline.fit import RayData, fit_kmeans_ray
from kmim.pipeline.runners import init_ray_on_loopback
from kmim.tokenizers.kmeans import FitData, LocalData, fit_kmeans

STEP = 64  # points per step of the overhead measurement


def ms_per_step(data: FitData, centroids: torch.Tensor, steps: int = 100) -> float:
    """Milliseconds per mini-batch step of STEP points (after 10 warm-up steps)."""
    data.start_epoch(torch.randperm(data.n, generator=torch.Generator().manual_seed(0)))
    starts = [(i * STEP) % (data.n - STEP) for i in range(steps + 10)]
    for start in starts[:10]:
        data.step(centroids, start, start + STEP, 0)
    t = time.perf_counter()
    for start in starts[10:]:
        data.step(centroids, start, start + STEP, 0)
    return (time.perf_counter() - t) / steps * 1e3


def step_overhead(refs: list, x: torch.Tensor, k: int, workers: list[int], exact: bool) -> dict[str, float]:
    """ms per step in-process and on each number of Ray actors (see :func:`ms_per_step`)."""
    centroids = x[:k].clone()
    local = LocalData(x, metric="l2", method="auto", exact=exact)
    if not exact:
        local.fast_method(None)
    out = {"in-process": ms_per_step(local, centroids)}
    for n in workers:
        with RayData(refs, workers=n, exact=exact) as data:
            if not exact:
                data.fast_method(None)
            out[f"ray-{n}"] = ms_per_step(data, centroids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunks", type=int, default=16, help="object-store chunks the points are split into")
    ap.add_argument("--fit-exact", action="store_true", help="the exact fit instead of the fast one")
    args = ap.parse_args()
    exact = args.fit_exact
    x, images = cifar_patches()
    n, d = x.shape
    common = {"bench": "kmeans_distributed", "points": n, "dim": d, "k": args.k, "epochs": args.epochs,
              "batch_size": args.batch_size, "images": images, "exact": exact}

    t = time.perf_counter()
    local = fit_kmeans(x, args.k, epochs=args.epochs, batch_size=args.batch_size, seed=0, exact=exact)
    results = {"in-process": (time.perf_counter() - t, local)}

    init_ray_on_loopback(logging_level=logging.WARNING, log_to_driver=False)
    refs = [ray.put(part.numpy()) for part in torch.tensor_split(x, args.chunks)]
    for workers in args.workers:
        t = time.perf_counter()
        r = fit_kmeans_ray(refs, args.k, workers=workers, epochs=args.epochs, batch_size=args.batch_size, seed=0,
                           exact=exact)
        results[f"ray-{workers}"] = (time.perf_counter() - t, r)

    for name, (seconds, r) in results.items():
        emit(**common, method=name, seconds=round(seconds, 2), inertia=r.inertia, inertia_per_patch=r.inertia / n,
             max_centroid_diff_vs_in_process=float((r.centroids - local.centroids).abs().max()))
    overhead = step_overhead(refs, x, args.k, args.workers, exact)
    emit(**common, method="step overhead", step_points=STEP, ms_per_step={k: round(v, 2) for k, v in overhead.items()})
    base_t, base = results["in-process"]
    emit(bench="kmeans_distributed", summary=True, machine=machine(), load_average=round(os.getloadavg()[0], 2), **{
        f"time_ratio_{name}": round(s / base_t, 2) for name, (s, _) in results.items() if name != "in-process"},
        **{f"inertia_ratio_{name}": round(r.inertia / base.inertia, 6)
           for name, (_, r) in results.items() if name != "in-process"},
        **{f"step_overhead_ms_{name}": round(v - overhead["in-process"], 2)
           for name, v in overhead.items() if name != "in-process"})
    ray.shutdown()


if __name__ == "__main__":
    main()
