"""Held-out evaluation: the linear probe on two datasets (CLS or mean pool) and `kmim eval finetune` (recipe, exact
resume, 2-process gloo DDP), on generated images whose classes are separable (colour and stripe direction)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import job_overrides, make_image_folder
from safetensors.torch import load_file
from test_train import TINY, TINY_DECODER, free_port, rows
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import load_config
from kmim.datasets.loader import TokenDataset
from kmim.datasets.preprocess import ViewSpec
from kmim.pipeline.job import run_job
from kmim.trainer.checkpoint import latest_checkpoint, load_state
from kmim.trainer.classifier import Classifier, layer_id, param_groups
from kmim.trainer.config import FinetuneConfig, TrainConfig
from kmim.trainer.ddp import Dist, TrainError
from kmim.trainer.engine import train
from kmim.trainer.finetune import FINETUNE_CONFIG, evaluate, finetune, make_loaders
from kmim.trainer.vit import ViT, vit_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A train dataset, a disjoint validation dataset tokenized with its codebook, and two short pre-training runs
    (with and without a CLS token)."""
    tmp = tmp_path_factory.mktemp("held_out")
    run_job(load_config(None, job_overrides(input=str(make_image_folder(tmp / "a", per_class=16, seed=1)),
                                            out=str(tmp / "train"))))
    run_job(load_config(None, job_overrides(input=str(make_image_folder(tmp / "b", per_class=8, seed=2)),
                                            out=str(tmp / "val"), codebook=str(tmp / "train"))))
    runs = {}
    for name, cls in (("mean", False), ("cls", True)):
        train(TrainConfig(data=str(tmp / "train"), out=str(tmp / name), batch_size=16, max_steps=2, log_every=1,
                          cls_token=cls, **TINY, **TINY_DECODER))
        runs[name] = tmp / name
    return {"train": tmp / "train", "val": tmp / "val", **runs}


def probe(args: list[str]) -> tuple[int, dict | str]:
    result = CliRunner().invoke(app, ["eval", "linprobe", "--json", "--epochs", "20", *args])
    if result.exit_code:
        return result.exit_code, result.output
    return 0, json.loads(result.stdout.strip().splitlines()[-1])


def test_linprobe_trains_on_one_dataset_and_measures_another(held_out: dict[str, Path]) -> None:
    data = ["--train-data", str(held_out["train"]), "--val-data", str(held_out["val"])]
    code, report = probe(["--checkpoint", str(held_out["cls"]), *data])
    assert code == 0, report
    assert report["split"] == "datasets" and report["pool"] == "cls" and report["classes"] == 3
    assert report["train_samples"] == 48 and report["test_samples"] == 24
    assert report["top1"] > 0.7 and report["knn_top1"] > 0.7, report  # chance is 1/3
    code, report = probe(["--checkpoint", str(held_out["cls"]), "--pool", "mean", *data])
    assert code == 0 and report["pool"] == "mean" and report["top1"] > 0.7, report
    code, report = probe(["--checkpoint", str(held_out["mean"]), *data])
    assert code == 0 and report["pool"] == "mean", report

    code, out = probe(["--checkpoint", str(held_out["mean"]), "--pool", "cls", *data])
    assert code == 1 and "pool" in out and "--cls-token" in out
    code, out = probe(["--checkpoint", str(held_out["mean"]), "--data", str(held_out["train"]), *data])
    assert code == 2 and "--train-data" in out
    code, out = probe(["--checkpoint", str(held_out["mean"]), "--train-data", str(held_out["train"])])
    assert code == 2


def finetune_config(held_out: dict[str, Path], out: Path, **kw) -> FinetuneConfig:
    base = {"checkpoint": str(held_out["mean"]), "train_data": str(held_out["train"]), "val_data": str(held_out["val"]),
            "out": str(out), "batch_size": 16, "epochs": 6, "blr": 2e-2, "log_every": 1, "device": "cpu"}
    return FinetuneConfig(**{**base, **kw})


def test_finetune_beats_chance_on_held_out_data(held_out: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "finetune", "--checkpoint", str(held_out["cls"]), "--train-data",
                                      str(held_out["train"]), "--val-data", str(held_out["val"]), "--out",
                                      str(tmp_path / "ft"), "--epochs", "8", "--batch-size", "16", "--blr", "2e-2",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pool"] == "cls" and summary["classes"] == 3 and summary["step"] == 24
    assert summary["best_val_top1"] > 0.7, summary  # chance is 1/3
    logged = rows(tmp_path / "ft" / "metrics.jsonl")
    assert [r["step"] for r in logged if "val_top1" in r] == list(range(3, 25, 3))  # after every epoch
    assert (tmp_path / "ft" / "curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "ft" / FINETUNE_CONFIG).read_text())
    assert saved["pretrained"]["step"] == 2 and saved["class_names"] == ["class_0", "class_1", "class_2"]

    again = CliRunner().invoke(app, ["eval", "finetune", "--checkpoint", str(held_out["cls"]), "--train-data",
                                     str(held_out["train"]), "--val-data", str(held_out["val"]), "--out",
                                     str(tmp_path / "ft"), "--device", "cpu"])
    assert again.exit_code == 1 and "--resume" in again.output


def test_finetune_resume_is_exact(held_out: dict[str, Path], tmp_path: Path) -> None:
    settings = {"accum_steps": 2, "checkpoint_every": 1, "epochs": 4, "drop_path": 0.3, "flip": 0.5}
    finetune(finetune_config(held_out, tmp_path / "a", **settings))
    finetune(finetune_config(held_out, tmp_path / "b", max_steps=3, **settings))
    assert latest_checkpoint(tmp_path / "b").step == 3
    summary = finetune(finetune_config(held_out, tmp_path / "b", resume=True, **settings))
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.step == b.step == summary["step"] == 4 * 1  # 48 samples / (16 x 2) -> 1 step per epoch
    wa, wb = load_file(a.weights), load_file(b.weights)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_state(a)["loader"] == load_state(b)["loader"]
    ma, mb = rows(tmp_path / "a" / "metrics.jsonl"), rows(tmp_path / "b" / "metrics.jsonl")
    assert [(r["loss"], r.get("val_top1")) for r in ma] == [(r["loss"], r.get("val_top1")) for r in mb]
    with pytest.raises(TrainError, match="label_smoothing"):
        finetune(finetune_config(held_out, tmp_path / "b", resume=True, label_smoothing=0.2, **settings))


def test_finetune_ddp_two_gloo_processes(held_out: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", str(BIN / "kmim"), "eval", "finetune", "--checkpoint",
           str(held_out["mean"]), "--train-data", str(held_out["train"]), "--val-data", str(held_out["val"]),
           "--out", str(out), "--batch-size", "8", "--epochs", "2", "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 6 and json.loads((out / FINETUNE_CONFIG).read_text())["world_size"] == 2
    # The ranks' validation counts every sample once: the same top-1 as one process on the saved weights.
    cfg = finetune_config(held_out, out, batch_size=8)
    pre = TrainConfig(**json.loads((held_out["mean"] / "config.json").read_text())["config"])
    model = Classifier(ViT(pre.encoder(), 32, 8), 3, "mean")
    model.load_state_dict(load_file(latest_checkpoint(out).weights))
    _, val = make_loaders(cfg, Dist(0, 1, torch.device("cpu")))
    assert evaluate(model, val, Dist(0, 1, torch.device("cpu"))) == summary["val_top1"]


def test_layer_decay_groups() -> None:
    model = Classifier(ViT(vit_config("tiny", dim=32, depth=3, heads=2), 32, 8, cls_token=True), 5, "cls")
    assert layer_id("encoder.cls_token", 3) == layer_id("encoder.patch_embed.weight", 3) == 0
    assert layer_id("encoder.blocks.blocks.2.attn.qkv.weight", 3) == 3
    assert layer_id("head.weight", 3) == layer_id("encoder.blocks.norm.bias", 3) == 4
    groups = param_groups(model, 0.05, 0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        assert g["lr_scale"] == 0.5 ** (4 - g["layer"])
        assert all((p.ndim >= 2) == (g["weight_decay"] == 0.05) for p in g["params"])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="pool"):
        Classifier(ViT(vit_config("tiny", dim=32, depth=1, heads=2), 32, 8), 5, "cls")


def test_fresh_crops_resume_and_carry_no_tokens(held_out: dict[str, Path]) -> None:
    def first(epoch: int, start: int = 0) -> dict:
        ds = TokenDataset(held_out["train"], batch_size=8, rank=0, world_size=1, crops=ViewSpec(scale=(0.2, 1.0)))
        return next(ds.batches(epoch, start))

    a, again = first(0), first(0)
    assert "tokens" not in a and a["view"].eq(-1).all() and a["image"].shape == (8, 3, 32, 32)
    assert torch.equal(a["image"], again["image"]) and torch.equal(a["flip"], again["flip"])
    assert not torch.equal(a["image"], first(1)["image"])  # a new crop every epoch
    # Mid-epoch start (a resumed loader): the sample at position 8 gets the same crop either way.
    ds = TokenDataset(held_out["train"], batch_size=8, rank=0, world_size=1, crops=ViewSpec(scale=(0.2, 1.0)))
    batches = ds.batches(0)
    next(batches)
    assert torch.equal(next(batches)["image"], first(0, 8)["image"])
