"""Multi-view token grids (``kmim run --views V``) on the CIFAR subset (image 32, patch 4, pixel extractor, K=50).

1. **tokenize**: for each V, the codebook is fitted once, then the shards are deleted and the job rerun, so the
   timed part is tokenization only. Images/s, shard bytes per sample, and the token bytes per view as a share
   of the image bytes.
2. **loader**: samples/s of one process reading the V=8 dataset with random views vs the center view only.
3. **table** (``--table``): K-MIM ViT-tiny pre-trained on the V=1 and the V=8 dataset for the same steps, seed
   and schedule, then the frozen-encoder linear probe and k-NN (view 0, split by key hash) on the V=1 dataset.

    .venv/bin/python benchmarks/views.py [--views 1,4,8] [--table --epochs 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tarfile
import time
from pathlib import Path

from common import CIFAR, emit, machine
from loader_throughput import PIXEL, K, job_settings

from kmim.config import load_config
from kmim.datasets.loader import TokenDataset
from kmim.datasets.manifest import read_manifest
from kmim.pipeline.job import run_job
from kmim.trainer.config import TrainConfig
from kmim.trainer.engine import train
from kmim.trainer.linprobe import ProbeConfig, linear_probe


def member_bytes(shard: Path) -> dict[str, int]:
    """Total bytes per member kind (``image``, ``tokens``, ``json``) of one shard tar."""
    totals = {"image": 0, "tokens": 0, "json": 0}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            kind = "tokens" if m.name.endswith(".tokens.npy") else "json" if m.name.endswith(".json") else "image"
            totals[kind] += m.size
    return totals


def bench_tokenize(views: int, out: Path) -> None:
    cfg = load_config(None, {**job_settings(out, PIXEL, CIFAR), "views": views, "batch_size": 256})
    run_job(cfg)
    for p in [*out.glob("shard-*"), out / "manifest.json"]:
        p.unlink()
    t = time.perf_counter()
    summary = run_job(cfg)
    seconds = time.perf_counter() - t
    manifest = read_manifest(out)
    sizes = [member_bytes(out / e["path"]) for e in manifest["shards"]]
    n = manifest["samples"]
    image, tokens = sum(s["image"] for s in sizes), sum(s["tokens"] for s in sizes)
    emit(bench="views_tokenize", views=views, images=n, seconds=round(seconds, 2),
         images_per_s=round(n / seconds, 1), views_per_s=round(n * views / seconds, 1),
         shard_bytes_per_sample=round(sum(e["bytes"] for e in manifest["shards"]) / n),
         token_bytes_per_view_share_of_image=round(tokens / views / image, 4),
         shares={k: round(v / sum(summary["timing"].values()), 3) for k, v in summary["timing"].items()},
         machine=machine())


def bench_loader(data: Path, batches: int = 40) -> None:
    for random_views in (True, False):
        ds = TokenDataset(data, batch_size=64, random_views=random_views, verify=True)
        it = ds.batches(0)
        next(it)  # the first shard read is not timed
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * 64 / (time.perf_counter() - t)
        emit(bench="views_loader", views=read_manifest(data)["token_grid"]["shape"][0], random_views=random_views,
             samples_per_s=round(rate, 1), machine=machine())


def bench_table(datasets: dict[int, Path], work: Path, args: argparse.Namespace) -> None:
    probe = ProbeConfig(epochs=args.probe_epochs, seed=0)
    steps = args.epochs * (read_manifest(datasets[1])["samples"] // 64)
    for views, data in datasets.items():
        out = work / f"kmim-v{views}"
        summary = train(TrainConfig(data=str(data), out=str(out), objective="kmim", model="tiny", epochs=args.epochs,
                                    batch_size=64, lr=1.5e-3, warmup_steps=20, seed=0, max_steps=steps,
                                    resume=out.exists()))
        report = linear_probe(out, datasets[1], probe, device="cpu")
        emit(bench="views_table", views=views, steps=summary["step"], train_s=summary["elapsed_s"],
             top1=round(report["top1"], 4), knn_top1=round(report["knn_top1"], 4),
             probe_train=report["train_samples"], probe_test=report["test_samples"], machine=machine())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", default="1,4,8")
    ap.add_argument("--cache", type=Path, default=Path("out/bench/views"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--probe-epochs", type=int, default=90)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets = {}
    for views in (int(v) for v in args.views.split(",")):
        out = args.cache / f"cifar-pixel-k{K}-v{views}"
        shutil.rmtree(out, ignore_errors=True)
        bench_tokenize(views, out)
        datasets[views] = out
    if max(datasets) > 1:
        bench_loader(datasets[max(datasets)])
    if args.table and 1 in datasets and max(datasets) > 1:
        bench_table({1: datasets[1], max(datasets): datasets[max(datasets)]}, args.cache / "runs", args)


if __name__ == "__main__":
    main()
