"""A small-scale version of the K-MIM paper's table, evaluated on held-out data: kmim (pixel tokens) vs mae,
+- MTO, against a randomly initialised encoder.

The CIFAR subset is split by a hash of each file's path into a train folder (80%) and a disjoint validation
folder (20%), copied once under ``--cache``. ``kmim fit``-equivalent: the train folder is tokenized with
``kmim run`` (image 32, patch 4, pixel extractor, K=50), the validation folder with ``kmim run --codebook`` (the
same tokenizer); the tokenizer report (TCAS in the K-MIM paper's C_ii form, utilization) is given for both.
ViT-tiny is pre-trained on the train split only, with each objective for the same number of epochs, seed and
schedule. Every encoder (and the random floor) is then evaluated on the validation split: ``kmim eval linprobe
--train-data TRAIN --val-data VAL`` (BatchNorm + linear head, weighted k-NN) and ``kmim eval finetune`` for
``--ft-epochs`` epochs (the MAE recipe; best and last validation top-1). MTO runs use the repo's MTOConfig;
``--mto-scale`` picks raw dot products (the paper's formula, the default), 1/sqrt(D)-scaled ones, or both. Runs are
kept under ``--out`` and resumed/reused. The runs are trained round-robin one epoch at a time, so a wall budget
(``--budget-min``) stops them all at the same epoch.

    .venv/bin/python benchmarks/paper_table.py --epochs 3 --budget-min 45 [--ft-epochs 3] [--mto-scale both]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from common import CIFAR, emit, machine
from loader_throughput import PATCH, PIXEL, K, build_dataset

from kmim.datasets.loader import open_manifest
from kmim.tokenizers.metrics import dataset_report
from kmim.trainer.checkpoint import latest_checkpoint, save_checkpoint
from kmim.trainer.config import FinetuneConfig, TrainConfig
from kmim.trainer.engine import build_model, dataset_info, train, write_run_config
from kmim.trainer.finetune import finetune
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


def split_folder(cache: Path, val_fraction: float = 0.2) -> tuple[Path, Path]:
    """``cache/cifar-split/{train,val}``: the CIFAR subset's files, each in one of them by
    ``sha256(relative path)`` (below ``val_fraction`` -> val), copied once."""
    out = cache / "cifar-split"
    if not (out / ".complete").exists():
        for f in sorted(p for p in CIFAR.rglob("*") if p.is_file()):
            rel = f.relative_to(CIFAR)
            u = int(hashlib.sha256(str(rel).encode()).hexdigest()[:16], 16) / 2**64
            dest = out / ("val" if u < val_fraction else "train") / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
        (out / ".complete").touch()
    return out / "train", out / "val"


def held_out_datasets(cache: Path) -> tuple[Path, Path]:
    """The train split tokenized (codebook fitted on it) and the validation split tokenized with that codebook."""
    train_folder, val_folder = split_folder(cache)
    train_ds = build_dataset(cache / f"cifar-train-pixel-k{K}", PIXEL, folder=train_folder)
    val_ds = build_dataset(cache / f"cifar-val-pixel-k{K}", {**PIXEL, "codebook": str(train_ds)}, folder=val_folder)
    for name, ds in (("train", train_ds), ("val", val_ds)):
        report = dataset_report(ds)
        emit(bench="paper_table_tokenizer", split=name, samples=report["samples"], tcas=round(report["tcas"], 4),
             utilization=round(report["utilization"], 4), perplexity=round(report["perplexity"], 2),
             tokenizer_id=open_manifest(ds)["tokenizer_id"])
    return train_ds, val_ds


def evaluate_run(name: str, out: Path, data: tuple[Path, Path], args: argparse.Namespace) -> dict:
    """Linear probe (train split -> validation split) and fine-tuning of one pre-trained run."""
    train_ds, val_ds = data
    report = linear_probe(out, train_ds, ProbeConfig(epochs=args.probe_epochs, seed=args.seed), val_data=val_ds,
                          device="cpu")
    ft = finetune(FinetuneConfig(checkpoint=str(out), train_data=str(train_ds), val_data=str(val_ds),
                                 out=str(out / f"finetune-e{args.ft_epochs}"), epochs=args.ft_epochs,
                                 batch_size=args.batch_size, seed=args.seed, workers=args.workers, device="cpu",
                                 log_every=args.log_every, resume=True))
    row = {"run": name, "probe_top1": round(report["top1"], 4), "knn_top1": round(report["knn_top1"], 4),
           "probe_train": report["train_samples"], "probe_val": report["test_samples"], "pool": report["pool"],
           "ft_epochs": args.ft_epochs, "ft_val_top1": ft.get("val_top1"), "ft_best_val_top1": ft.get("best_val_top1"),
           "ft_s": ft["elapsed_s"]}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("out/bench"), help="the split and its datasets are kept here")
    ap.add_argument("--out", type=Path, default=Path("out/bench/paper-table-held-out"), help="run directories")
    ap.add_argument("--objectives", default="kmim,mae")
    ap.add_argument("--mto-scale", choices=("off", "on", "both"), default="off",
                    help="MTO dot products: off = raw (paper's formula, MTOConfig default), on = 1/sqrt(D)")
    ap.add_argument("--no-mto", action="store_true", help="leave out the MTO runs")
    ap.add_argument("--epochs", type=int, default=3, help="length of the learning-rate schedule")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--probe-epochs", type=int, default=90)
    ap.add_argument("--ft-epochs", type=int, default=3, help="fine-tuning epochs of every encoder")
    ap.add_argument("--budget-min", type=float, default=0, help="wall minutes for training all runs; a new "
                    "round of one epoch per run starts only if the slowest round so far still fits (0 = no limit)")
    ap.add_argument("--stop-epoch", type=int, default=0, help="train at most this many epochs of the schedule")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps of each run")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = held_out_datasets(args.cache)
    runs = runs_for(args.objectives.split(","), args.mto_scale)
    runs = [r for r in runs if not (args.no_mto and r.mto)]
    args.steps_per_epoch = open_manifest(data[0])["samples"] // args.batch_size  # the loader's drop_last batches
    if args.time_steps:
        time_steps(data[0], args.out, runs, args)
        return
    base = {"bench": "paper_table", "epochs": args.epochs, "model": "tiny", "patch_size": PATCH, "k": K,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    random_init_run(data[0], args.out / "random-init", args)
    results = {"random-init": evaluate_run("random-init", args.out / "random-init", data, args)}
    emit(**base, epochs_trained=0, **results["random-init"], machine=machine())
    train_round_robin(runs, data[0], args)
    for run in runs:
        out = run_dir(args, run)
        timing = json.loads((out / "bench.json").read_text())
        results[run.name] = evaluate_run(run.name, out, data, args)
        trained = round(timing["steps"] / args.steps_per_epoch, 2)
        emit(**base, objective=run.objective, mto=run.mto, epochs_trained=trained, **timing, **results[run.name],
             final=last_metrics(out), machine=machine())
    metrics = ("probe_top1", "knn_top1", "ft_best_val_top1")
    delta = {f"{a} - {b}": {m: round(results[a][m] - results[b][m], 4) for m in metrics}
             for a, b in [("kmim", "random-init"), ("mae", "random-init"), ("kmim", "mae"), ("kmim+mto", "kmim"),
                          ("mae+mto", "mae"), ("kmim+mto-scaled", "kmim"), ("mae+mto-scaled", "mae")]
             if a in results and b in results}
    emit(bench="paper_table_summary", epochs=args.epochs, deltas=delta)


if __name__ == "__main__":
    main()
