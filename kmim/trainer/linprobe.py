"""Frozen-encoder evaluation of a training run: linear probe (MAE protocol) and k-NN top-1.

Features are ``encoder_features`` of the unmasked image, [N, D] float32: the CLS token's output (``pool="cls"``,
the default for a model trained with a CLS token) or the mean of the patch tokens' outputs (``"mean"``, the default
otherwise), extracted once with the training loader (no augmentation, the center view, manifest order). Samples
without a label are left out. The head is trained on one labelled dataset and measured on another
(``val_data``: held-out data, e.g. a validation split tokenized with the same codebook), or, for a single
dataset, on a split that is a pure function of the sample key: ``sha256(f"{split_seed}:{key}")`` read as a number
in [0, 1) below ``train_fraction`` puts the sample in the train split, else in the held-out split.

- Linear probe: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, classes)`` (weights
  N(0, 0.01) truncated, bias 0), as MAE; trained on the train split with SGD (momentum 0.9, no weight decay,
  learning rate ``lr * batch_size / 256`` with a per-step cosine decay; the paper's LARS matters only for its
  16k batch), then top-1 on the held-out split.
- k-NN: features standardized with the train split's per-dimension mean and std (what the probe's BatchNorm
  does; mean-pooled MIM features share a large common component that otherwise dominates the cosine), then
  cosine similarity to the train split; the ``k`` nearest neighbours each vote for their class with weight
  ``exp(similarity / temperature)`` (the DINO / InstDisc weighted k-NN); top-1 of the votes.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kmim.datasets.loader import TokenDataset, TokenLoader, open_manifest
from kmim.trainer.checkpoint import load_weights
from kmim.trainer.engine import build_model, pretrained_run
from kmim.trainer.objectives import MIMObjective


@dataclass(frozen=True)
class ProbeConfig:
    train_fraction: float = 0.8
    split_seed: int = 0
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if min(self.epochs, self.batch_size, self.knn_k) < 1 or self.lr <= 0 or self.knn_temperature <= 0:
            raise ValueError(f"epochs, batch_size, knn_k must be >= 1 and lr, knn_temperature > 0: {self}")


@dataclass
class Features:
    """features float32 [N, D], labels int64 [N] (-1 = none), keys: N sample keys."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


def load_encoder(run_dir: str | os.PathLike, device: torch.device) -> tuple[MIMObjective, dict, int]:
    """The run's model with its latest checkpoint's weights, in eval mode -> (model, dataset info, step)."""
    cfg, info, ckpt = pretrained_run(run_dir)
    model = build_model(cfg, info)
    load_weights(model, ckpt)
    return model.to(device).eval(), info, ckpt.step


@torch.no_grad()
def extract_features(model: MIMObjective, data: str | os.PathLike, device: torch.device, batch_size: int = 256,
                     workers: int = 0, pool: str = "mean") -> Features:
    """Every sample of the dataset once, in manifest order; ``pool`` as :meth:`ViT.features`."""
    ds = TokenDataset(data, batch_size=batch_size, shuffle=False, drop_last=False, rank=0, world_size=1,
                      random_views=False)
    n = int(ds.offsets[-1])
    feats, labels, keys = [], [], []
    for batch in TokenLoader(ds, num_workers=workers):
        feats.append(model.encoder_features(batch["image"].to(device), pool).cpu())
        labels.append(batch["label"])
        keys.extend(batch["key"])
    # drop_last=False pads the last batch by repeating the first samples.
    return Features(torch.cat(feats)[:n], torch.cat(labels)[:n], keys[:n])


def split_by_key(keys: list[str], train_fraction: float, seed: int) -> torch.Tensor:
    """bool [N], True = train split; depends only on each key, the fraction and the seed."""
    u = [int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:16], 16) / 2**64 for k in keys]
    return torch.tensor(u) < train_fraction


def train_linear(x: torch.Tensor, y: torch.Tensor, classes: int, cfg: ProbeConfig) -> nn.Module:
    """BatchNorm (no affine) + linear head trained on x [N, D], y [N]; returned in eval mode."""
    gen = torch.Generator().manual_seed(cfg.seed)
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6), nn.Linear(x.shape[1], classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)
    nn.init.zeros_(head[1].bias)
    head = head.to(x.device).train()
    lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen).to(x.device)
        idx = order[(step % per_epoch) * cfg.batch_size:][:cfg.batch_size]
        if len(idx) < 2:  # BatchNorm needs two samples to normalize
            continue
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted k-NN top-1 (cosine similarity of standardized features, votes ``exp(sim / temperature)``);
    features [N, D]."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    bank = F.normalize((train_x - mean) / std, dim=1)
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = F.normalize((test_x[i:i + chunk] - mean) / std, dim=1) @ bank.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_y[i:i + chunk]).sum())
    return correct / len(test_x)


def resolve_pool(pool: str, has_cls: bool) -> str:
    """``auto`` -> ``cls`` when the encoder has a CLS token (``has_cls``), else ``mean``; ``cls`` without one is
    refused."""
    if pool == "auto":
        return "cls" if has_cls else "mean"
    if pool not in ("cls", "mean"):
        raise ValueError(f"field 'pool': expected auto, cls or mean, got {pool!r}")
    if pool == "cls" and not has_cls:
        raise ValueError("field 'pool': 'cls' needs a model trained with --cls-token; this one has none "
                         "(use mean)")
    return pool


def eval_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


def check_eval_data(datasets: list[str | os.PathLike], image_size: int, run_dir: str | os.PathLike) -> list[str]:
    """The datasets' class names (the first's): every dataset must have ``image_size`` px images and, when
    several are given, the same class names (labels index into them)."""
    names = None
    for data in datasets:
        manifest = open_manifest(data)
        size = manifest["preprocess"]["image_size"]
        if size != image_size:
            raise ValueError(f"{data}: {size}px images, the model of {run_dir} was trained on {image_size}px")
        labels = manifest.get("labels") or []
        if names is not None and labels != names:
            raise ValueError(f"{data}: field 'labels' {labels[:5]}... differs from {datasets[0]}'s "
                             f"{names[:5]}...; train and validation data must share their classes")
        names = labels if names is None else names
    return names or []


def labelled(feats: Features) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The labelled samples' (features [n, D], labels [n], keys)."""
    keep = feats.labels >= 0
    return feats.features[keep], feats.labels[keep], [k for k, m in zip(feats.keys, keep.tolist(), strict=True) if m]


def probe_splits(model: MIMObjective, data: str | os.PathLike, val_data: str | os.PathLike | None,
                 cfg: ProbeConfig, pool: str, dev: torch.device, workers: int) -> tuple[dict, dict]:
    """(train, test) splits ``{"x": [n, D], "y": [n], "unlabelled": int}``: all of ``data`` and all of
    ``val_data``, or with ``val_data`` None, ``data`` split by key hash."""
    def feats(d: str | os.PathLike) -> Features:
        return extract_features(model, d, dev, cfg.batch_size, workers, pool)

    first = feats(data)
    x, y, keys = labelled(first)
    unlabelled = len(first.keys) - len(keys)
    if val_data is None:
        train = split_by_key(keys, cfg.train_fraction, cfg.split_seed)
        if int(train.sum()) < 2 or int((~train).sum()) < 1:
            raise ValueError(f"{data}: {len(keys)} labelled samples are too few for a {cfg.train_fraction:.0%} / "
                             f"{1 - cfg.train_fraction:.0%} split")
        return ({"x": x[train], "y": y[train], "unlabelled": unlabelled},
                {"x": x[~train], "y": y[~train], "unlabelled": 0})
    second = feats(val_data)
    vx, vy, vkeys = labelled(second)
    if len(keys) < 2 or not vkeys:
        raise ValueError(f"{data if len(keys) < 2 else val_data}: too few labelled samples to probe")
    return ({"x": x, "y": y, "unlabelled": unlabelled},
            {"x": vx, "y": vy, "unlabelled": len(second.keys) - len(vkeys)})


def linear_probe(run_dir: str | os.PathLike, data: str | os.PathLike, cfg: ProbeConfig = ProbeConfig(), *,
                 val_data: str | os.PathLike | None = None, pool: str = "auto", device: str = "auto",
                 workers: int = 0) -> dict:
    """Evaluate the run's latest checkpoint: train the head on ``data`` and measure top-1 on ``val_data``, or,
    without ``val_data``, on ``data``'s key-hash split. Returns top1, knn_top1 (fractions) and the setup."""
    dev = eval_device(device)
    model, info, step = load_encoder(run_dir, dev)
    pool = resolve_pool(pool, model.encoder.cls_token is not None)
    names = check_eval_data([data] + ([val_data] if val_data is not None else []), info["image_size"], run_dir)
    train, test = probe_splits(model, data, val_data, cfg, pool, dev, workers)
    classes = max(len(names), int(torch.cat([train["y"], test["y"]]).max()) + 1)
    x, y, tx, ty = train["x"].to(dev), train["y"].to(dev), test["x"].to(dev), test["y"].to(dev)
    head = train_linear(x, y, classes, cfg)
    with torch.no_grad():
        top1 = (head(tx).argmax(dim=1) == ty).float().mean().item()
    knn = knn_top1(x, y, tx, ty, classes, cfg.knn_k, cfg.knn_temperature)
    return {"top1": top1, "knn_top1": knn, "checkpoint_step": step, "classes": classes, "chance": 1 / classes,
            "pool": pool, "split": "key_hash" if val_data is None else "datasets",
            "train_samples": len(x), "test_samples": len(tx), "feature_dim": x.shape[1],
            "unlabelled": train["unlabelled"] + test["unlabelled"], "epochs": cfg.epochs, "knn_k": cfg.knn_k,
            "knn_temperature": cfg.knn_temperature, "run_dir": str(Path(run_dir)), "data": str(data),
            "val_data": None if val_data is None else str(val_data)}
