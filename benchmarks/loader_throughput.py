"""Loader throughput: precomputed token shards vs a folder-of-images loader that tokenizes online (BEiT-v2 way).

Both sides deliver the same training batch (normalized images float32 [B, 3, S, S] + token grid int64
[B, h, w] + labels) from the CIFAR subset (image 32, patch 4, K=50):

- ``kmim``: :class:`kmim.datasets.loader.TokenLoader` over a dataset built by ``kmim run`` (reused from
  ``--cache``; sha256 of each shard checked on read, the training default).
- ``online``: an ImageFolder-style ``DataLoader`` over the same folder whose workers decode with the same
  :func:`decode_view` and normalize; the consumer then runs the tokenizer forward on each batch in the main
  process, as BEiT v2 does in its training step: the same extractor, then :func:`kmim.tokenizers.assign.nearest`
  against the same codebook.

Same batch size, same worker count, a fixed number of batches after ``--warmup`` excluded batches. Also timed:
the tokenizer forward alone on one pre-decoded batch (``tokenize_only``). No model step runs: the rates are
what the loaders can feed a training step at most. Extractors: ``pixel`` (required; its forward is cheap) and
``dino``, a randomly initialised ViT built through ``model_kwargs`` (default: ViT-S/16 sized, 12 blocks, width
384, at 128 px input so that its 16 px patches give the 8 x 8 grid; weights do not change the cost). Its
tokenization is slow on CPU, so the dino comparison uses the first ``--dino-per-class`` images of each class
(copied once under ``--cache``) and times ``--dino-batches`` batches of the online loader.

    .venv/bin/python benchmarks/loader_throughput.py [--cache out/bench] [--extractors pixel,dino]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Generator, Iterable
from pathlib import Path

import numpy as np
import torch
from common import CIFAR, emit, machine
from torch.utils.data import DataLoader, Dataset

from kmim.config import load_config
from kmim.datasets.codebook import load_codebook
from kmim.datasets.loader import IMAGENET_MEAN, IMAGENET_STD, TokenDataset, TokenLoader
from kmim.datasets.preprocess import IMAGE_EXTS, Preprocess, decode_view
from kmim.pipeline.job import run_job
from kmim.pipeline.specs import extractor_spec
from kmim.tokenizers.assign import nearest
from kmim.tokenizers.extractors import Extractor, build_extractor

IMAGE, PATCH, K = 32, 4, 50
PIXEL = {"extractor": "pixel"}
DINO_MODEL = "vit_small_patch16_224"
DINO_KWARGS = {"depth": 12, "embed_dim": 384, "num_heads": 6, "img_size": 128}


def job_settings(out: Path, extra: dict, folder: Path = CIFAR) -> dict:
    """The ``kmim run`` settings of a benchmark dataset of ``folder`` (default: the CIFAR subset)."""
    return {"input": str(folder), "out": str(out), "image_size": IMAGE, "patch_size": PATCH, "k": K, "seed": 0,
            "runner": "local", "shard_size": 500, **extra}


def build_dataset(out: Path, extra: dict = PIXEL, folder: Path = CIFAR) -> Path:
    """Tokenize ``folder`` into ``out`` with ``kmim run`` (a finished dataset is reused as is)."""
    if not folder.is_dir():
        raise SystemExit(f"image folder not found at {folder} (set KMIM_CIFAR)")
    run_job(load_config(None, job_settings(out, extra, folder)))
    return out


def class_subset(cache: Path, per_class: int) -> Path:
    """A copy of the first ``per_class`` images (sorted by name) of each CIFAR-subset class, made once."""
    out = cache / f"cifar-first{per_class}"
    if not (out / ".complete").exists():
        for cls in sorted(p for p in CIFAR.iterdir() if p.is_dir()):
            (out / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copyfile(f, out / cls.name / f.name)
        (out / ".complete").touch()
    return out


def dino_settings(cache: Path, kwargs: dict) -> dict:
    """Settings of the random-weight DINO-style extractor; its weights file is created once under ``cache``."""
    from safetensors.torch import save_file

    from kmim.tokenizers import dino

    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    weights = cache / f"random-{DINO_MODEL}-{tag}.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        sd = dino.build(DINO_MODEL, kwargs, None, None, None).module.state_dict()
        cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(weights))
    return {"extractor": "dino", "model": DINO_MODEL, "model_kwargs": json.dumps(kwargs), "weights": str(weights),
            "fit_images": 512}


class ImageFolderView(Dataset):
    """ImageFolder-style: label = index of the sorted class folder; item = (uint8 view, normalized image, label)."""

    def __init__(self, root: Path, image_size: int):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
                      if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
        self.pre = Preprocess(image_size)
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)
        self.std = np.asarray(IMAGENET_STD, np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, label = self.files[i]
        pixels = decode_view(path.read_bytes(), self.pre).pixels
        image = ((pixels.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), torch.from_numpy(image.copy()), label


class OnlineTokenizer:
    """The tokenizer forward of one batch: extractor, then exact nearest centroid of the codebook."""

    def __init__(self, extractor: Extractor, centroids: torch.Tensor):
        self.extractor, self.centroids = extractor, centroids

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.extractor(pixels)
        b, h, w, d = feats.shape
        index, _ = nearest(feats.reshape(-1, d), self.centroids, metric=self.extractor.metric)
        return index.reshape(b, h, w)


def kmim_batches(root: Path, batch_size: int, workers: int) -> Generator[dict, None, None]:
    """Training batches from the precomputed shards, across epochs (workers restart per epoch, as in training)."""
    loader = TokenLoader(TokenDataset(root, batch_size=batch_size, seed=0, rank=0, world_size=1),
                         num_workers=workers)
    while True:
        for batch in loader:
            yield {"image": batch["image"], "tokens": batch["tokens"], "label": batch["label"]}


def online_batches(folder: Path, tokenizer: OnlineTokenizer, batch_size: int,
                   workers: int) -> Generator[dict, None, None]:
    """Training batches from the image folder, tokenized in the consumer like a BEiT-v2 training step.

    Workers restart at each epoch, as :class:`TokenLoader`'s do (neither loader keeps persistent workers)."""
    loader = DataLoader(ImageFolderView(folder, IMAGE), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    while True:
        for pixels, image, label in loader:
            yield {"image": image, "tokens": tokenizer(pixels), "label": label}


def time_batches(batches: Iterable[dict], warmup: int, n: int) -> float:
    """Seconds to take ``n`` batches after ``warmup`` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        batch = next(it)
        assert batch["tokens"].shape[1:] == (IMAGE // PATCH,) * 2
    return time.perf_counter() - t


def time_tokenizer(tokenizer: OnlineTokenizer, pixels: torch.Tensor, n: int) -> float:
    """Seconds per tokenizer forward of one batch (median of ``n``, after one warm-up)."""
    tokenizer(pixels)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        tokenizer(pixels)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_extractor(name: str, args: argparse.Namespace) -> None:
    """Emit the kmim, online and tokenize-only results of one extractor, then their ratios."""
    if name == "pixel":
        extra, folder, root = PIXEL, CIFAR, args.cache / f"cifar-pixel-k{K}"
    else:
        extra, folder = dino_settings(args.cache, args.dino_kwargs), class_subset(args.cache, args.dino_per_class)
        root = args.cache / f"{folder.name}-dino-k{K}"
    build_dataset(root, extra, folder)
    book = load_codebook(root / "codebook.safetensors")
    cfg = load_config(None, job_settings(root, extra, folder))
    tokenizer = OnlineTokenizer(build_extractor(extractor_spec(cfg)), book.centroids)
    # The kmim side is cheap, so it always gets --batches: a few batches would be mostly the prefetched ones.
    counts = {"kmim": args.batches, "online": args.batches if name == "pixel" else args.dino_batches}
    base = {"bench": "loader", "extractor": name, "batch_size": args.batch_size, "workers": args.workers,
            "images": len(ImageFolderView(folder, IMAGE)), "warmup": args.warmup,
            "image_size": IMAGE, "patch_size": PATCH, "k": K}
    rates = {}
    makers = {"kmim": lambda: kmim_batches(root, args.batch_size, args.workers),
              "online": lambda: online_batches(folder, tokenizer, args.batch_size, args.workers)}
    for side, make in makers.items():
        stream = make()
        batches = counts[side]
        seconds = time_batches(stream, args.warmup, batches)
        stream.close()  # stops the DataLoader workers before the next measurement
        rates[side] = batches * args.batch_size / seconds
        emit(**base, loader=side, batches=batches, seconds=round(seconds, 3), samples_per_s=round(rates[side], 1),
             ms_per_batch=round(1000 * seconds / batches, 2), load_avg_1m=os.getloadavg()[0], machine=machine())
    sample = next(iter(DataLoader(ImageFolderView(folder, IMAGE), batch_size=args.batch_size)))[0]
    tok_s = time_tokenizer(tokenizer, sample, args.tokenizer_reps if name == "pixel" else 3)
    emit(**base, loader="tokenize_only", ms_per_batch=round(1000 * tok_s, 2),
         samples_per_s=round(args.batch_size / tok_s, 1), load_avg_1m=os.getloadavg()[0], machine=machine())
    saved_ms = 1000 * args.batch_size * (1 / rates["online"] - 1 / rates["kmim"])
    emit(bench="loader_summary", extractor=name, speedup_kmim_over_online=round(rates["kmim"] / rates["online"], 2),
         saved_ms_per_batch=round(saved_ms, 2), tokenizer_ms_per_batch=round(1000 * tok_s, 2),
         saved_at_least_tokenizer_cost=bool(saved_ms >= 1000 * tok_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("out/bench"), help="datasets and weights are kept here")
    ap.add_argument("--extractors", default="pixel,dino")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tokenizer-reps", type=int, default=10)
    ap.add_argument("--dino-batches", type=int, default=15, help="timed batches of the online dino loader")
    ap.add_argument("--dino-per-class", type=int, default=128, help="the dino dataset holds this many images "
                    "per class (its tokenization is slow on CPU)")
    ap.add_argument("--dino-kwargs", type=json.loads, default=DINO_KWARGS, help="timm create_model overrides")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.extractors.split(","):
        bench_extractor(name, args)


if __name__ == "__main__":
    main()
