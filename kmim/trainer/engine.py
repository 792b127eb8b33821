"""The training loop: one readable function in the nanoGPT style, single-process or under ``torchrun``.

Launch: ``kmim train ...`` (one process) or ``torchrun --nproc-per-node N --no-python kmim train ...``
(DDP: NCCL on CUDA, gloo on CPU; rank 0 writes every file). Per optimizer step every rank runs
``accum_steps`` micro-batches, gradients are all-reduced on the last one only (``no_sync`` before), the
global gradient norm is clipped, and AdamW steps with a per-step learning rate (linear warmup, cosine decay).

Determinism: the model is initialised from ``seed``; the sample order is the loader's pure function of
(seed, epoch, world layout); the masks of micro-batch ``m`` of step ``s`` on rank ``r`` come from a fresh
``torch.Generator`` seeded with (seed, r, s, m). So a run resumed from a checkpoint continues exactly as the
uninterrupted run would (bitwise on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel
from torch import nn

from kmim import __version__
from kmim.config import material_settings
from kmim.datasets.loader import TokenDataset, TokenLoader, open_manifest
from kmim.files import atomic_write
from kmim.trainer.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
    set_rng_state,
)
from kmim.trainer.config import TrainConfig
from kmim.trainer.ddp import Dist, MetricWindow, TrainError, distributed, gather_rng, grad_sync, wrap_ddp
from kmim.trainer.objectives import MIMObjective, build_objective
from kmim.trainer.plot import MIM_PANELS, plot_curves

log = logging.getLogger("kmim")

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
BETAS = (0.9, 0.95)  # MAE's AdamW betas


def dataset_info(manifest: dict) -> dict:
    """What a run needs to know about its dataset: tokenizer, view geometry, codebook size, classes."""
    return {"tokenizer_id": manifest.get("tokenizer_id"), "image_size": manifest["preprocess"]["image_size"],
            "patch_size": manifest["token_grid"]["patch_size"], "k": manifest["codebook"]["k"],
            "classes": len(manifest.get("labels") or [])}


def build_model(cfg: TrainConfig, info: dict) -> MIMObjective:
    """The configured objective for a dataset described by :func:`dataset_info`."""
    return build_objective(cfg.objective, cfg.model, info["image_size"], info["patch_size"], info["k"],
                           cfg.mto_config(), encoder=cfg.encoder(), decoder=cfg.decoder(),
                           mask_ratio=cfg.reconstruction_ratio if cfg.objective == "mapet" else cfg.mask_ratio,
                           cls_token=cfg.cls_token, cut=cfg.cut, amp=cfg.amp)


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """``RUN_DIR/config.json``: ``config`` (TrainConfig fields), ``dataset`` (dataset_info), ``world_size``."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: not a kmim run directory (no {RUN_CONFIG})") from None


def pretrained_run(run_dir: str | os.PathLike) -> tuple[TrainConfig, dict, Checkpoint]:
    """A training run's settings, dataset info (see :func:`read_run_config`) and latest checkpoint, read once (the
    run may still be training)."""
    saved = read_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet")
    return TrainConfig(**saved["config"]), saved["dataset"], ckpt


def warmup_cosine(step: int, peak: float, min_lr: float, warmup: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``peak * (step + 1) / warmup`` during warmup, then a
    half cosine from ``peak`` to ``min_lr`` reaching ``min_lr`` at ``total_steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The training run's :func:`warmup_cosine` learning rate of step ``step``."""
    return warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A 64-bit seed that depends only on (seed, rank, step, micro-step)."""
    words = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def masking_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, rank, step, micro-step)."""
    return torch.Generator().manual_seed(step_seed(seed, rank, step, micro))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases, norm weights and learned tokens (every parameter with < 2 dims) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS)


def check_run_dir(cfg: TrainConfig, info: dict) -> None:
    """Refuse a run directory this run cannot continue (an existing run without --resume, another tokenizer,
    a changed material setting: :func:`kmim.config.material_settings`)."""
    run = Path(cfg.out)
    if (run / RUN_CONFIG).exists():
        if not cfg.resume:
            raise TrainError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
        previous = read_run_config(run)
        if previous["dataset"]["tokenizer_id"] != info["tokenizer_id"]:
            raise TrainError(f"{cfg.data}: tokenizer_id {info['tokenizer_id']!r} is not the "
                             f"{previous['dataset']['tokenizer_id']!r} this run was trained on (tokens from "
                             "another codebook)")
        check_material(previous["config"], cfg, run / RUN_CONFIG)


def check_material(old: dict, cfg: BaseModel, where: Path) -> None:
    """Refuse a resume whose material settings differ from ``old`` (the settings saved in ``where``); a field
    missing from ``old`` (written before the field existed) counts as its default."""
    for field, value in material_settings(cfg).items():
        before = old.get(field, type(cfg).model_fields[field].default)
        if before != value:
            raise TrainError(f"--resume: field '{field}' is {before!r} in {where}, {value!r} now; it must not "
                             "change within a run")


def write_run_config(cfg: TrainConfig, info: dict, world: int) -> None:
    """(Re)write ``RUN_DIR/config.json`` with this run's settings."""
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    body = {"config": cfg.model_dump(), "dataset": info, "world_size": world, "kmim_version": __version__}
    atomic_write(run / RUN_CONFIG, lambda p: p.write_text(json.dumps(body, indent=1) + "\n"))


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the lines of ``path`` logged after ``step``: a resumed run logs those steps again."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


def forever(loader: TokenLoader) -> Iterator[dict]:
    """Batches across epoch boundaries; the loader keeps the position."""
    while True:
        yield from loader


@dataclass(frozen=True)
class Schedule:
    """A run's length, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int  # the learning-rate schedule spans ``epochs`` epochs
    stop: int  # the step this invocation ends at: ``total_steps``, or ``max_steps`` when that is sooner
    ckpt_every: int
    samples_per_step: int  # images per optimizer step, over all ranks

    @classmethod
    def of(cls, cfg: TrainConfig, world: int, batches_per_epoch: int) -> Schedule:
        """The schedule of ``cfg`` over ``world`` ranks that each get ``batches_per_epoch`` micro-batches."""
        steps_per_epoch = batches_per_epoch // cfg.accum_steps
        if steps_per_epoch == 0:
            raise TrainError(f"{batches_per_epoch} batches per rank per epoch are fewer than one step of field "
                             f"'accum_steps' = {cfg.accum_steps} micro-batches")
        total = cfg.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, min(total, cfg.max_steps or total), cfg.checkpoint_every or steps_per_epoch,
                   cfg.batch_size * cfg.accum_steps * world)

    def epoch(self, step: int) -> float:
        """Epochs done after ``step`` optimizer steps (4 decimals)."""
        return round(step / self.steps_per_epoch, 4)


def open_run_dir(cfg: TrainConfig, d: Dist) -> dict:
    """Check the run directory on every rank, then (rank 0) write its config; returns :func:`dataset_info`."""
    info = dataset_info(open_manifest(cfg.data))
    check_run_dir(cfg, info)
    if d.world > 1:
        dist.barrier()  # every rank checks the run directory before rank 0 writes into it
    if d.main:
        write_run_config(cfg, info, d.world)
    return info


def make_loader(cfg: TrainConfig, d: Dist, info: dict) -> TokenLoader:
    """This rank's resumable loader of ``batch_size``-image micro-batches."""
    dataset = TokenDataset(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_window=cfg.shuffle_window,
                           rank=d.rank, world_size=d.world, expect_tokenizer_id=info["tokenizer_id"],
                           verify=cfg.verify)
    return TokenLoader(dataset, num_workers=cfg.workers, pin_memory=d.device.type == "cuda")


def resume_state(cfg: TrainConfig, d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loader: TokenLoader) -> int:
    """With ``--resume``, restore weights, optimizer, loader position and this rank's RNG states from the run's
    latest checkpoint. Returns the optimizer step to start at (0 without a checkpoint)."""
    run = Path(cfg.out)
    ckpt = latest_checkpoint(run) if cfg.resume else None
    if ckpt is None:
        if cfg.resume:
            log.info("--resume: %s has no checkpoint yet, starting at step 0", run)
        return 0
    state = load_state(ckpt)
    load_weights(model, ckpt)
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"][d.rank])
    log.info("resumed %s at step %d (epoch %d)", run, ckpt.step, loader.epoch)
    return ckpt.step


def truncate_logs(run: Path, d: Dist, step: int, sample_log: Path | None) -> None:
    """Drop the metrics rows (rank 0) and this rank's sample-log lines of steps after ``step``."""
    if d.main:
        truncate_jsonl(run / METRICS, step)
    if sample_log:
        truncate_jsonl(sample_log, step)


def forward_backward(ddp: nn.Module, batch: dict, cfg: TrainConfig, d: Dist, step: int, micro: int) -> dict:
    """Outputs (``loss`` and metrics) of micro-batch ``micro`` of optimizer step ``step`` (0-based), whose
    gradient, ``loss / accum_steps``, is added to the parameters'; DDP all-reduces on the last micro-batch only."""
    images = batch["image"].to(d.device, non_blocking=True)
    tokens = batch["tokens"].to(d.device, non_blocking=True)
    with grad_sync(ddp, d, micro, cfg.accum_steps):
        out = ddp(images, tokens, generator=masking_generator(cfg.seed, d.rank, step, micro))
        (out["loss"] / cfg.accum_steps).backward()
    return out


def append_samples(path: Path, step: int, micro: int, batch: dict) -> None:
    """Audit log: the sample indices of micro-batch ``micro`` of step ``step`` (1-based), one JSON line."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "micro": micro, "index": batch["index"].tolist()}) + "\n")


def finish_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, step: int,
                loss: torch.Tensor) -> torch.Tensor:
    """End optimizer step ``step`` (0-based) once its micro-batches' gradients are in: :func:`clip_gradients`, the
    update, gradients cleared. Returns the gradient norm before clipping."""
    norm = clip_gradients(model, grad_clip, step, loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def clip_gradients(model: nn.Module, grad_clip: float, step: int, loss: torch.Tensor) -> torch.Tensor:
    """Clip the global gradient norm to ``grad_clip`` (0 = no clipping); returns the norm before clipping.
    Raises :class:`TrainError` when it is not finite (``step`` 0-based, ``loss`` for the message)."""
    # The norm is of the all-reduced gradients, so every rank reaches the same verdict.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if not math.isfinite(norm.item()):
        raise TrainError(f"step {step + 1}: non-finite loss or gradients (loss {loss.item():.4g}, "
                         f"grad norm {norm.item():.4g}); stopped without saving. Lower --lr or raise "
                         "--warmup-steps, and resume from the last checkpoint")
    return norm


def save_state(run: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loader: TokenLoader,
               d: Dist, tokenizer_id: str | None) -> None:
    """Checkpoint after ``step``: every rank's RNG states are gathered (a collective), rank 0 writes."""
    rngs = gather_rng(d.world)
    if d.main:
        save_checkpoint(run, step, model, {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                                           "rng": rngs, "tokenizer_id": tokenizer_id})


class Progress:
    """Throughput, ETA and the metrics log of one invocation: rank 0 appends a ``metrics.jsonl`` row and logs a
    line per :meth:`log`."""

    def __init__(self, run: Path, d: Dist, sched: Schedule, step: int, panels: tuple = MIM_PANELS) -> None:
        self.run, self.d, self.sched, self.panels = run, d, sched, panels
        self.t_start = self.t_log = time.perf_counter()
        self.start_step = self.step_log = step

    def log(self, step: int, lr: float, means: dict[str, float | list[float]]) -> None:
        """Log step ``step`` (done) with learning rate ``lr`` and the window's ``means``."""
        now = time.perf_counter()
        rate = (step - self.step_log) * self.sched.samples_per_step / (now - self.t_log)
        self.t_log, self.step_log = now, step
        if not self.d.main:
            return
        row = {"step": step, "epoch": self.sched.epoch(step), "lr": lr, "samples_per_s": round(rate, 2), **means}
        with open(self.run / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        eta = (self.sched.stop - step) * (now - self.t_start) / (step - self.start_step)
        acc = f" | acc {means['acc']:.4f}" if "acc" in means else ""
        log.info("step %d/%d | epoch %.2f | loss %.4f%s | lr %.3g | %.1f samples/s | ETA %.0fs",
                 step, self.sched.stop, row["epoch"], means["loss"], acc, lr, rate, eta)

    def summary(self, step: int) -> dict:
        """The run's summary after ``step``; rank 0 also plots ``curves.png`` from the metrics log."""
        elapsed = time.perf_counter() - self.t_start
        rate = (step - self.start_step) * self.sched.samples_per_step / elapsed if step > self.start_step else None
        summary = {"run_dir": str(self.run), "step": step, "total_steps": self.sched.total_steps,
                   "epoch": self.sched.epoch(step), "elapsed_s": round(elapsed, 2),
                   "samples_per_s": None if rate is None else round(rate, 2)}
        if self.d.main and (self.run / METRICS).exists():
            plot_curves(self.run / METRICS, self.run / CURVES, self.panels)
            summary["curves"] = str(self.run / CURVES)
        return summary


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary on every rank. See the module docstring."""
    return distributed(cfg.device, lambda d: _train(cfg, d))


def _train(cfg: TrainConfig, d: Dist) -> dict:
    run = Path(cfg.out)
    info = open_run_dir(cfg, d)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info).to(d.device)
    optimizer = make_optimizer(model, cfg)
    loader = make_loader(cfg, d, info)
    sched = Schedule.of(cfg, d.world, loader.dataset.batches_per_epoch)
    step = resume_state(cfg, d, model, optimizer, loader)
    sample_log = run / f"samples.rank{d.rank}.jsonl" if cfg.sample_log else None
    truncate_logs(run, d, step, sample_log)
    ddp = wrap_ddp(model, d)
    model.train()
    log.info("training %s%s (%.1fM parameters) on %s x %d: %d steps of %d samples, %d steps per epoch",
             cfg.objective, " + MTO" if cfg.mto else "", sum(p.numel() for p in model.parameters()) / 1e6,
             d.device, d.world, sched.total_steps, sched.samples_per_step, sched.steps_per_epoch)

    batches, window, progress = forever(loader), MetricWindow(), Progress(run, d, sched, step)
    while step < sched.stop:
        lr = lr_at(step, cfg, sched.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.accum_steps):
            batch = next(batches)
            out = forward_backward(ddp, batch, cfg, d, step, micro)
            window.add(out)
            if sample_log:
                append_samples(sample_log, step + 1, micro, batch)
        window.add({"grad_norm": finish_step(model, optimizer, cfg.grad_clip, step, out["loss"])})
        step += 1

        if step % cfg.log_every == 0 or step == sched.stop:
            progress.log(step, lr, window.means(d.world))
        if step % sched.ckpt_every == 0 or step == sched.stop:
            save_state(run, step, model, optimizer, loader, d, info["tokenizer_id"])

    summary = progress.summary(step)
    if d.world > 1:
        dist.barrier()
    return summary
