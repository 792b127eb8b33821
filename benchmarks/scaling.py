"""Ray scaling of `kmim run` on the CIFAR subset: in-process runner vs an embedded Ray with 1 and 2 workers.

For each runner: the whole job from scratch (fit + tokenize, Ray workers cold), then tokenization again with
the codebook kept and the shards deleted (workers warm). Prints seconds, images/s, the ratio to the local
runner, and the share of wall time x workers spent inside the stage (decode/extract/assign/write) -- the rest
is scheduling, process start-up and idle workers.

    .venv/bin/python benchmarks/scaling.py [--configs local,ray1,ray2] [--k 1024] [--shard-size 500]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import ray
from common import CIFAR, emit, machine

from kmim.config import load_config
from kmim.datasets.manifest import MANIFEST
from kmim.pipeline.job import run_job
from kmim.pipeline.runners import init_ray_on_loopback

WORKERS = {"local": 1, "ray1": 1, "ray2": 2}


def timed_job(cfg) -> tuple[float, dict]:
    t = time.perf_counter()
    summary = run_job(cfg)
    return time.perf_counter() - t, summary


def measure(name: str, work: Path, args: argparse.Namespace) -> list[dict]:
    """Both phases of one runner configuration, as result dicts."""
    out = work / name
    cfg = load_config(None, {"input": str(CIFAR), "out": str(out), "image_size": 32, "patch_size": 4, "k": args.k,
                             "kmeans_epochs": args.kmeans_epochs, "shard_size": args.shard_size, "batch_size": 256,
                             "runner": "local" if name == "local" else "ray"})
    ray_start = 0.0
    if name != "local":
        t = time.perf_counter()
        init_ray_on_loopback(num_cpus=WORKERS[name], logging_level=logging.WARNING, log_to_driver=False)
        ray_start = time.perf_counter() - t
    try:
        job_s, summary = timed_job(cfg)
        for p in out.glob("shard-*"):
            p.unlink()
        (out / MANIFEST).unlink()
        tok_s, tok = timed_job(cfg)
    finally:
        ray.shutdown()
    workers = WORKERS[name]
    return [{"runner": name, "workers": workers, "phase": "job", "images": summary["samples"],
             "seconds": round(job_s, 2), "ray_start_s": round(ray_start, 2),
             "images_per_s": round(summary["samples"] / job_s, 1)},
            {"runner": name, "workers": workers, "phase": "tokenize", "images": tok["samples"], "shards": tok["shards"],
             "seconds": round(tok_s, 2), "images_per_s": round(tok["samples"] / tok_s, 1),
             "stage_share": round(sum(tok["timing"].values()) / (tok_s * workers), 3)}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="local,ray1,ray2")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--kmeans-epochs", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=500)
    args = ap.parse_args()
    if not CIFAR.is_dir():
        raise SystemExit(f"CIFAR subset not found at {CIFAR} (set KMIM_CIFAR)")
    for path in CIFAR.rglob("*"):  # into the page cache, so the first configuration does not pay for the disk
        if path.is_file():
            path.read_bytes()
    work = Path(tempfile.mkdtemp(prefix="kmim-scaling-"))
    local: dict[str, float] = {}
    try:
        for name in args.configs.split(","):
            for result in measure(name, work, args):
                if name == "local":
                    local[result["phase"]] = result["seconds"]
                if result["phase"] in local:
                    result["vs_local"] = round(result["seconds"] / local[result["phase"]], 2)
                emit(bench="scaling", **result, k=args.k, machine=machine())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
