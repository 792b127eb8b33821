"""Frozen-encoder evaluation of a training run: linear probe (MAE protocol) and k-NN top-1.

Features are ``encoder_features`` (mean-pooled patch tokens of the unmasked image, [N, D] float32), extracted
once with the training loader (no augmentation, the center view, manifest order). Samples without a label are left out.
The split is a pure function of the sample key: ``sha256(f"{split_seed}:{key}")`` read as a number in
[0, 1) below ``train_fraction`` puts the sample in the train split, else in the held-out split.

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
from kmim.trainer.checkpoint import CheckpointError, latest_checkpoint, load_weights
from kmim.trainer.config import TrainConfig
from kmim.trainer.engine import build_model, read_run_config
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
    saved = read_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet")
    model = build_model(TrainConfig(**saved["config"]), saved["dataset"])
    load_weights(model, ckpt)
    return model.to(device).eval(), saved["dataset"], ckpt.step


@torch.no_grad()
def extract_features(model: MIMObjective, data: str | os.PathLike, device: torch.device, batch_size: int = 256,
                     workers: int = 0) -> Features:
    """Every sample of the dataset once, in manifest order."""
    ds = TokenDataset(data, batch_size=batch_size, shuffle=False, drop_last=False, rank=0, world_size=1,
                      random_views=False)
    n = int(ds.offsets[-1])
    feats, labels, keys = [], [], []
    for batch in TokenLoader(ds, num_workers=workers):
        feats.append(model.encoder_features(batch["image"].to(device)).cpu())
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


def linear_probe(run_dir: str | os.PathLike, data: str | os.PathLike, cfg: ProbeConfig = ProbeConfig(), *,
                 device: str = "auto", workers: int = 0) -> dict:
    """Evaluate the run's latest checkpoint on ``data``; returns top1, knn_top1 (fractions) and the setup."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    model, info, step = load_encoder(run_dir, dev)
    size = open_manifest(data)["preprocess"]["image_size"]
    if size != info["image_size"]:
        raise ValueError(f"{data}: {size}px images, the model of {run_dir} was trained on {info['image_size']}px")
    feats = extract_features(model, data, dev, cfg.batch_size, workers)
    labelled = feats.labels >= 0
    x, y = feats.features[labelled].to(dev), feats.labels[labelled].to(dev)
    train = split_by_key([k for k, keep in zip(feats.keys, labelled.tolist(), strict=True) if keep],
                         cfg.train_fraction, cfg.split_seed).to(dev)
    if int(train.sum()) < 2 or int((~train).sum()) < 1:
        raise ValueError(f"{data}: {int(labelled.sum())} labelled samples are too few for a "
                         f"{cfg.train_fraction:.0%} / {1 - cfg.train_fraction:.0%} split")
    classes = int(y.max()) + 1
    head = train_linear(x[train], y[train], classes, cfg)
    with torch.no_grad():
        top1 = (head(x[~train]).argmax(dim=1) == y[~train]).float().mean().item()
    knn = knn_top1(x[train], y[train], x[~train], y[~train], classes, cfg.knn_k, cfg.knn_temperature)
    return {"top1": top1, "knn_top1": knn, "checkpoint_step": step, "classes": classes, "chance": 1 / classes,
            "train_samples": int(train.sum()), "test_samples": int((~train).sum()), "feature_dim": x.shape[1],
            "unlabelled": int((~labelled).sum()), "epochs": cfg.epochs, "knn_k": cfg.knn_k,
            "knn_temperature": cfg.knn_temperature, "run_dir": str(Path(run_dir)), "data": str(data)}
