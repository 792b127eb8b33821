"""A small-scale version of the K-MIM paper's table: linear probe of kmim (pixel tokens) vs mae, +- MTO.

The CIFAR subset is tokenized with ``kmim run`` (image 32, patch 4, pixel extractor, K=50; reused from
``--cache``). ViT-tiny is pre-trained with each objective for the same number of epochs, seed and schedule,
then evaluated with the trainer's own frozen-encoder evaluation (``kmim eval linprobe``: BatchNorm + linear
head on a split by sample-key hash, and weighted k-NN top-1). A randomly initialised encoder is probed the same
way as the floor. MTO runs use the repo's MTOConfig; ``--mto-scale`` picks raw dot products (the paper's
formula, the default), 1/sqrt(D)-scaled ones, or both. Runs are kept under ``--out`` and resumed/reused. The runs are
trained round-robin one epoch at a time, so a wall budget (``--budget-min``) stops them all at the same epoch.

    .venv/bin/python benchmarks/paper_table.py --epochs 3 --budget-min 45 [--mto-scale both] [--time-steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from common import emit, machine
from loader_throughput import PATCH, PIXEL, K, build_dataset

from kmim.datasets.loader import open_manifest
from kmim.trainer.checkpoint import latest_checkpoint, save_checkpoint
from kmim.trainer.config import TrainConfig
from kmim.trainer.engine import build_model, dataset_info, train, write_run_config
from kmim.trainer.linprobe import ProbeConfig, linear_probe
from kmim.trainer.mto import MTOConfig


class ScaledMTOConfig(TrainConfig):
    """TrainConfig whose MTO dot products are scaled by 1/sqrt(D) (MTOConfig.scale, not a CLI flag)."""

    def mto_config(self) -> MTOConfig | None:
        mto = super().mto_config()
        return None if mto is None else dataclasses.replace(mto, scale=True)


@dataclasses.dataclass(frozen=True)
class Run:
    objective: str
    mto: bool = False
    scale: bool = False

    @property
    def name(self) -> str:
        return self.objective + ("+mto" + ("-scaled" if self.scale else "") if self.mto else "")


def runs_for(objectives: list[str], mto_scale: str) -> list[Run]:
    """Without MTO, then with it (raw and/or scaled dot products), for every objective."""
    scales = {"off": [False], "on": [True], "both": [False, True]}[mto_scale]
    return ([Run(o) for o in objectives] + [Run(o, True, s) for s in scales for o in objectives])


def train_config(run: Run, data: Path, out: Path, args: argparse.Namespace, **extra) -> TrainConfig:
    cls = ScaledMTOConfig if run.scale else TrainConfig
    return cls(data=str(data), out=str(out), objective=run.objective, mto=run.mto, model="tiny",
               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
               seed=args.seed, workers=args.workers, log_every=args.log_every, resume=True, **extra)


def train_to(run: Run, data: Path, out: Path, epoch: int, args: argparse.Namespace) -> dict:
    """Train (resuming) ``run`` up to the end of ``epoch``; the cumulative timing is kept in ``bench.json``."""
    record = out / "bench.json"
    state = json.loads(record.read_text()) if record.exists() else {"train_s": 0.0, "steps": 0}
    steps = epoch * args.steps_per_epoch
    if state["steps"] < steps:
        summary = train(train_config(run, data, out, args, max_steps=steps))
        state = {"train_s": round(state["train_s"] + summary["elapsed_s"], 2), "steps": summary["step"],
                 "mto_scale": run.scale if run.mto else None}
        record.write_text(json.dumps(state) + "\n")
    return state


def train_round_robin(runs: list[Run], data: Path, args: argparse.Namespace) -> int:
    """Train every run one epoch at a time, in turn, while the wall budget allows another whole round.

    All runs share one schedule (``--epochs``), so stopping early leaves them at the same step with the same
    (truncated) learning-rate curve. Returns the number of epochs every run completed."""
    t0, slowest, done = time.perf_counter(), 0.0, 0
    for epoch in range(1, min(args.epochs, args.stop_epoch or args.epochs) + 1):
        elapsed = time.perf_counter() - t0
        if args.budget_min and elapsed + slowest > 60 * args.budget_min:
            logging.info("budget: %.0fs spent, a round takes ~%.0fs; stopping after epoch %d", elapsed, slowest, done)
            break
        t = time.perf_counter()
        for run in runs:
            train_to(run, data, run_dir(args, run), epoch, args)
        slowest, done = max(slowest, time.perf_counter() - t), epoch
        emit(bench="paper_table_progress", epoch=epoch, round_s=round(time.perf_counter() - t, 1),
             elapsed_s=round(time.perf_counter() - t0, 1))
    return done


def run_dir(args: argparse.Namespace, run: Run) -> Path:
    return args.out / f"{run.name}-e{args.epochs}"


def last_metrics(out: Path) -> dict:
    """Final logged training metrics: main loss, token accuracy (kmim), H(0..n) (MTO)."""
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    keep = {"loss": row.get("loss_main", row["loss"]), "acc": row.get("acc"), "mto_loss": row.get("mto_loss")}
    if "mto_h" in row:
        keep["mto_h"] = [round(h, 4) for h in row["mto_h"]]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in keep.items() if v is not None}


def random_init_run(data: Path, out: Path, args: argparse.Namespace) -> None:
    """A run directory whose only checkpoint (step 0) is the seed's initialisation, for the probe floor."""
    if latest_checkpoint(out) is not None:
        return
    cfg = train_config(Run("kmim"), data, out, args)
    info = dataset_info(open_manifest(data))
    torch.manual_seed(cfg.seed)
    write_run_config(cfg, info, 1)
    save_checkpoint(out, 0, build_model(cfg, info), {})


def time_steps(data: Path, out: Path, runs: list[Run], args: argparse.Namespace) -> None:
    """Seconds per optimizer step of each run over ``--time-steps`` steps, and the implied seconds per epoch."""
    for run in runs:
        work = out / "timing" / run.name
        if work.exists():
            for p in sorted(work.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
        summary = train(train_config(run, data, work, args, max_steps=args.time_steps))
        per_epoch = summary["total_steps"] / args.epochs
        s_per_step = summary["elapsed_s"] / summary["step"]
        emit(bench="paper_table_timing", run=run.name, steps=summary["step"], s_per_step=round(s_per_step, 3),
             s_per_epoch=round(s_per_step * per_epoch, 1), machine=machine())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("out/bench"), help="the tokenized dataset is kept here")
    ap.add_argument("--out", type=Path, default=Path("out/bench/paper-table"), help="run directories")
    ap.add_argument("--objectives", default="kmim,mae")
    ap.add_argument("--mto-scale", choices=("off", "on", "both"), default="off",
                    help="MTO dot products: off = raw (paper's formula, MTOConfig default), on = 1/sqrt(D)")
    ap.add_argument("--epochs", type=int, default=3, help="length of the learning-rate schedule")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--probe-epochs", type=int, default=90)
    ap.add_argument("--budget-min", type=float, default=0, help="wall minutes for training all runs; a new "
                    "round of one epoch per run starts only if the slowest round so far still fits (0 = no limit)")
    ap.add_argument("--stop-epoch", type=int, default=0, help="train at most this many epochs of the schedule")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps of each run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = build_dataset(args.cache / f"cifar-pixel-k{K}", PIXEL)
    runs = runs_for(args.objectives.split(","), args.mto_scale)
    args.steps_per_epoch = open_manifest(data)["samples"] // args.batch_size  # the loader's drop_last batches
    if args.time_steps:
        time_steps(data, args.out, runs, args)
        return
    probe = ProbeConfig(epochs=args.probe_epochs, seed=args.seed)
    base = {"bench": "paper_table", "epochs": args.epochs, "model": "tiny", "patch_size": PATCH, "k": K,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    results = {}
    random_init_run(data, args.out / "random-init", args)
    floor = linear_probe(args.out / "random-init", data, probe, device="cpu")
    emit(**base, run="random-init", epochs_trained=0, top1=round(floor["top1"], 4),
         knn_top1=round(floor["knn_top1"], 4), machine=machine())
    train_round_robin(runs, data, args)
    for run in runs:
        out = run_dir(args, run)
        timing = json.loads((out / "bench.json").read_text())
        report = linear_probe(out, data, probe, device="cpu")
        results[run.name] = report
        emit(**base, run=run.name, objective=run.objective, mto=run.mto,
             epochs_trained=round(timing["steps"] / args.steps_per_epoch, 2), **timing,
             top1=round(report["top1"], 4), knn_top1=round(report["knn_top1"], 4), probe_train=report["train_samples"],
             probe_test=report["test_samples"], final=last_metrics(out), machine=machine())
    delta = {f"{a} - {b}": {m: round(results[a][m] - results[b][m], 4) for m in ("top1", "knn_top1")}
             for a, b in [("kmim", "mae"), ("kmim+mto", "kmim"), ("mae+mto", "mae"),
                          ("kmim+mto-scaled", "kmim"), ("mae+mto-scaled", "mae")] if a in results and b in results}
    emit(bench="paper_table_summary", epochs=args.epochs, deltas=delta)


if __name__ == "__main__":
    main()
