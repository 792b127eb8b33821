"""Fine-tuning evaluation (``kmim eval finetune``): the MAE / BEiT end-to-end recipe on a labelled dataset, top-1
on a held-out one.

Single process, or DDP under ``torchrun --no-python kmim eval finetune ...`` (gloo on CPU, NCCL on CUDA), with the
training loop's pieces (:mod:`kmim.trainer.engine`): accumulation, the all-reduce on the last micro-batch,
checkpoints and exact resume (weights, optimizer, loader position; drop path draws from torch's RNG re-seeded for
every micro-batch from (seed, rank, step, micro-batch), crops are a pure function of (seed, epoch, position)).

Recipe (see :class:`~kmim.trainer.config.FinetuneConfig`): the pre-trained encoder with drop path, a fresh head
(:mod:`kmim.trainer.classifier`); AdamW (betas 0.9 / 0.999) with layer-wise lr decay, peak lr = blr * images per
step / 256, linear warmup then cosine to ``min_lr`` (per step); cross-entropy with label smoothing; each training
image a fresh random resized crop (area share in [crop_scale_min, 1], ratio 3/4 - 4/3) + flip rendered from the
stored image. Validation: the center view, no augmentation, every sample exactly once over all ranks, after
every epoch and at the end; ``val_top1`` goes to ``metrics.jsonl`` and ``curves.png``. Samples without a label
(-1) are left out of the loss and of top-1. Mixup / CutMix / random erasing are not part of this recipe.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kmim import __version__
from kmim.datasets.loader import TokenDataset, TokenLoader
from kmim.datasets.preprocess import ViewSpec
from kmim.files import atomic_write
from kmim.trainer.checkpoint import Checkpoint, load_weights
from kmim.trainer.classifier import Classifier, param_groups
from kmim.trainer.config import FinetuneConfig, TrainConfig
from kmim.trainer.ddp import Dist, MetricWindow, TrainError, distributed, grad_sync, wrap_ddp
from kmim.trainer.engine import (
    METRICS,
    Progress,
    Schedule,
    check_material,
    finish_step,
    forever,
    pretrained_run,
    resume_state,
    save_state,
    step_seed,
    truncate_logs,
    warmup_cosine,
)
from kmim.trainer.linprobe import check_eval_data, resolve_pool
from kmim.trainer.plot import FINETUNE_PANELS
from kmim.trainer.vit import ViT

log = logging.getLogger("kmim")

FINETUNE_CONFIG = "finetune.json"
BETAS = (0.9, 0.999)  # MAE / BEiT fine-tuning


def setup_run(cfg: FinetuneConfig, d: Dist, pre: TrainConfig, info: dict, ckpt: Checkpoint) -> dict:
    """Check the data and the run directory on every rank, then (rank 0) write ``finetune.json``; returns what the
    run records about its start: classes, class names, pool, the pre-trained checkpoint."""
    names = check_eval_data([cfg.train_data, cfg.val_data], info["image_size"], cfg.checkpoint)
    classes = cfg.classes or len(names)
    if classes < 2:
        raise TrainError(f"{cfg.train_data}: field 'labels': no class names; give --classes")
    pool = resolve_pool(cfg.pool, pre.cls_token)
    run = Path(cfg.out)
    body = {"config": cfg.model_dump(), "classes": classes, "class_names": names, "pool": pool,
            "pretrained": {"run": str(cfg.checkpoint), "step": ckpt.step, "config": pre.model_dump(),
                           "dataset": info}, "world_size": d.world, "kmim_version": __version__}
    if (run / FINETUNE_CONFIG).exists():
        if not cfg.resume:
            raise TrainError(f"{run} already holds a fine-tuning run; pass --resume to continue it or choose "
                             "another --out")
        old = json.loads((run / FINETUNE_CONFIG).read_text())
        check_material(old["config"], cfg, run / FINETUNE_CONFIG)
        if old["classes"] != classes:
            raise TrainError(f"--resume: {classes} classes now, {old['classes']} in {run / FINETUNE_CONFIG}")
    if d.world > 1:
        dist.barrier()  # every rank checks the run directory before rank 0 writes into it
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write(run / FINETUNE_CONFIG, lambda p: p.write_text(json.dumps(body, indent=1) + "\n"))
    return body


def build_classifier(cfg: FinetuneConfig, pre: TrainConfig, info: dict, ckpt: Checkpoint, classes: int,
                     pool: str) -> Classifier:
    """The pre-trained encoder (from ``ckpt``) with drop path and a fresh head."""
    encoder = ViT(pre.encoder(), info["image_size"], info["patch_size"], cls_token=pre.cls_token,
                  drop_path=cfg.drop_path)
    load_weights(encoder, ckpt, prefix="encoder.")
    return Classifier(encoder, classes, pool, amp=cfg.amp)


def make_loaders(cfg: FinetuneConfig, d: Dist) -> tuple[TokenLoader, TokenDataset]:
    """This rank's training loader (fresh crops) and validation dataset (center view, padded, not shuffled)."""
    crops = ViewSpec(scale=(cfg.crop_scale_min, 1.0), flip=cfg.flip)
    train = TokenDataset(cfg.train_data, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_window=cfg.shuffle_window,
                         rank=d.rank, world_size=d.world, crops=crops, verify=cfg.verify)
    val = TokenDataset(cfg.val_data, batch_size=cfg.batch_size, shuffle=False, drop_last=False, rank=d.rank,
                       world_size=d.world, random_views=False, verify=cfg.verify)
    return TokenLoader(train, num_workers=cfg.workers, pin_memory=d.device.type == "cuda"), val


@torch.no_grad()
def evaluate(model: Classifier, val: TokenDataset, d: Dist) -> float:
    """Top-1 (fraction) over the labelled samples of the validation data, each counted once over all ranks
    (the padding that evens out the ranks is left out); a collective when ``world > 1``."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    total = int(val.offsets[-1])
    position = d.rank * val.samples_per_rank
    for batch in val.batches(0):
        labels = batch["label"]
        keep = (labels >= 0) & (position + torch.arange(len(labels)) < total)
        position += len(labels)
        pred = model(batch["image"].to(d.device)).argmax(dim=1).cpu()
        counts += torch.tensor([float((pred[keep] == labels[keep]).sum()), float(keep.sum())], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(counts)
    model.train()
    if counts[1] == 0:
        raise TrainError(f"{val.root}: no labelled samples to validate on")
    return float(counts[0] / counts[1])


def step_loss(ddp: torch.nn.Module, batch: dict, cfg: FinetuneConfig, d: Dist, step: int, micro: int) -> dict:
    """Loss and train top-1 of micro-batch ``micro`` of optimizer step ``step`` (0-based); its gradient
    (``loss / accum_steps``) is added to the parameters' (DDP all-reduces on the last micro-batch only)."""
    images, labels = batch["image"].to(d.device, non_blocking=True), batch["label"].to(d.device, non_blocking=True)
    # A DataLoader draws from the global RNG when it starts, so drop path gets its own seeded stream.
    with (grad_sync(ddp, d, micro, cfg.accum_steps),
          torch.random.fork_rng(devices=[d.device.index] if d.device.type == "cuda" else [])):
        torch.manual_seed(step_seed(cfg.seed, d.rank, step, micro))
        logits = ddp(images)
        loss = F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=cfg.label_smoothing)
        (loss / cfg.accum_steps).backward()
    keep = labels >= 0
    acc = (logits.detach().argmax(dim=1)[keep] == labels[keep]).float().mean()
    return {"loss": loss.detach(), "acc": acc}


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) fine-tuning as configured; returns a summary on every rank. See the module docstring."""
    return distributed(cfg.device, lambda d: _finetune(cfg, d))


def _finetune(cfg: FinetuneConfig, d: Dist) -> dict:
    pre, info, ckpt = pretrained_run(cfg.checkpoint)
    setup = setup_run(cfg, d, pre, info, ckpt)
    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg, pre, info, ckpt, setup["classes"], setup["pool"]).to(d.device)
    decay = cfg.decay_for(pre.model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, decay), lr=0.0, betas=BETAS)
    loader, val = make_loaders(cfg, d)
    sched = Schedule.of(cfg, d.world, loader.dataset.batches_per_epoch)
    peak, warmup = cfg.blr * sched.samples_per_step / 256, round(cfg.warmup() * sched.steps_per_epoch)
    step = resume_state(cfg, d, model, optimizer, loader)
    run = Path(cfg.out)
    truncate_logs(run, d, step, None)
    ddp = wrap_ddp(model, d)
    model.train()
    log.info("fine-tuning %s (%s pool, %d classes, layer decay %.2f, peak lr %.3g) on %s x %d: %d steps of %d "
             "samples", cfg.checkpoint, setup["pool"], setup["classes"], decay, peak, d.device, d.world,
             sched.total_steps, sched.samples_per_step)
    batches, window, progress = forever(loader), MetricWindow(), Progress(run, d, sched, step, FINETUNE_PANELS)
    top1 = None
    while step < sched.stop:
        lr = warmup_cosine(step, peak, cfg.min_lr, warmup, sched.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for micro in range(cfg.accum_steps):
            out = step_loss(ddp, next(batches), cfg, d, step, micro)
            window.add(out)
        window.add({"grad_norm": finish_step(model, optimizer, cfg.grad_clip, step, out["loss"])})
        step += 1
        epoch_end = step % sched.steps_per_epoch == 0 or step == sched.stop
        if epoch_end:
            top1 = evaluate(model, val, d)
        if step % cfg.log_every == 0 or epoch_end:
            progress.log(step, lr, {**window.means(d.world), **({"val_top1": top1} if epoch_end else {})})
        if step % sched.ckpt_every == 0 or step == sched.stop:
            save_state(run, step, model, optimizer, loader, d, None)
    summary = {**progress.summary(step), "val_top1": top1, "classes": setup["classes"], "pool": setup["pool"],
               "pretrained_step": setup["pretrained"]["step"]}
    if d.main:
        summary.update(best_of(run))
    if d.world > 1:
        dist.barrier()
    return summary


def best_of(run_dir: str | os.PathLike) -> dict:
    """The last and the best ``val_top1`` (and its step) in a fine-tuning run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    scores = [(r["val_top1"], r["step"]) for r in rows if "val_top1" in r]
    if not scores:
        return {}
    best = max(scores, key=lambda s: s[0])
    return {"val_top1": scores[-1][0], "best_val_top1": best[0], "best_step": best[1]}
