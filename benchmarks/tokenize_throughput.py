"""Tokenization throughput of `kmim run` on the CIFAR subset (image 32, patch 4, K=1024).

The codebook is fitted once; then the shards are deleted and the job rerun, so the timed part is
tokenization only (decode -> extract -> exact assign -> write). Prints images/s, patches/s, the
share of worker time in each phase and the seconds of the write phase, per runner, with the load average.

    .venv/bin/python benchmarks/tokenize_throughput.py [--runners local,ray]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import CIFAR, emit, machine

from kmim.config import load_config
from kmim.pipeline.job import run_job


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runners", default="local,ray")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--shard-size", type=int, default=500)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kmim-bench-"))
    try:
        for runner in args.runners.split(","):
            out = work / runner
            cfg = load_config(None, {"input": str(CIFAR), "out": str(out), "image_size": 32, "patch_size": 4,
                                     "k": args.k, "kmeans_epochs": 10, "shard_size": args.shard_size,
                                     "runner": runner, "batch_size": 256})
            run_job(cfg)
            for p in out.glob("shard-*"):
                p.unlink()
            (out / "manifest.json").unlink()
            t = time.perf_counter()
            summary = run_job(cfg)
            seconds = time.perf_counter() - t
            busy = sum(summary["timing"].values())
            patches = summary["samples"] * (32 // 4) ** 2
            emit(bench="tokenize", runner=runner, images=summary["samples"], shards=summary["shards"],
                 seconds=round(seconds, 2), images_per_s=round(summary["samples"] / seconds, 1),
                 patches_per_s=round(patches / seconds), k=args.k,
                 shares={phase: round(s / busy, 3) for phase, s in summary["timing"].items()},
                 write_s=round(summary["timing"]["write"], 3), load=[round(x, 2) for x in os.getloadavg()],
                 machine=machine())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
