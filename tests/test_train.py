"""Training loop: two-process gloo DDP, exact resume, falling losses, non-finite stop, run-directory refusals."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kmim.config import ConfigError, load_config
from kmim.pipeline.job import run_job
from kmim.trainer import engine
from kmim.trainer.checkpoint import latest_checkpoint, load_state
from kmim.trainer.config import TrainConfig, load_train_config
from kmim.trainer.engine import TrainError, train

TINY = {"model_dim": 64, "model_depth": 2, "model_heads": 2}
TINY_DECODER = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2}
BIN = Path(sys.executable).parent


def digits_dataset(root: Path, per_class: int) -> Path:
    """A committed 32 px / patch 4 / K=16 dataset of the first ``per_class`` sklearn digits of each class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        folder = root / "images" / str(label)
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            pixels = np.rint(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"{j}.png")
    run_job(load_config(None, {"out": str(root / "ds"), "input": str(root / "images"), "image_size": 32,
                               "patch_size": 4, "k": 16, "kmeans_epochs": 2, "fit_patches": 5000, "shard_size": 50,
                               "runner": "local"}))
    return root / "ds"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_dataset(tmp_path_factory.mktemp("digits"), per_class=24)


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = {"data": str(data), "out": str(out), "batch_size": 16, "lr": 1e-3, "log_every": 1, **TINY}
    if kw.get("objective", "kmim") != "beit":
        base.update(TINY_DECODER)
    return TrainConfig(**{**base, **kw})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_see_disjoint_samples(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", str(BIN / "kmim"), "train", "--data", str(dataset),
           "--out", str(run), "--objective", "beit", "--batch-size", "8", "--accum-steps", "2", "--max-steps", "4",
           "--log-every", "2", "--sample-log", "--device", "cpu",
           *itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in TINY.items())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [rows(run / f"samples.rank{r}.jsonl") for r in range(2)]
    # Equal step counts: both ranks ran 4 steps of 2 micro-batches of 8 samples.
    for log in seen:
        assert [(r["step"], r["micro"]) for r in log] == [(s, m) for s in range(1, 5) for m in range(2)]
        assert all(len(r["index"]) == 8 for r in log)
    ids = [{i for r in log for i in r["index"]} for log in seen]
    assert len(ids[0]) == len(ids[1]) == 64 and not ids[0] & ids[1]
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [2, 4]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert latest_checkpoint(run).step == 4 and (run / "curves.png").stat().st_size > 0


def test_resume_is_exact(dataset: Path, tmp_path: Path) -> None:
    settings = {"mto": True, "accum_steps": 2, "checkpoint_every": 2, "warmup_steps": 2,
                "epochs": 2}
    train(tiny(dataset, tmp_path / "a", max_steps=6, **settings))
    train(tiny(dataset, tmp_path / "b", max_steps=3, **settings))
    assert latest_checkpoint(tmp_path / "b").step == 3
    train(tiny(dataset, tmp_path / "b", max_steps=6, resume=True, **settings))

    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.step == b.step == 6
    wa, wb = load_file(a.weights), load_file(b.weights)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = load_state(a), load_state(b)  # torch.load(weights_only=True) inside
    assert sa["loader"] == sb["loader"]
    opt_a, opt_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # The resumed run re-logs the steps after its checkpoint once, with the same values.
    ma, mb = rows(tmp_path / "a" / "metrics.jsonl"), rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in mb] == list(range(1, 7))
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == rb["loss"] and ra["mto_h"] == rb["mto_h"] and ra["lr"] == rb["lr"]
    assert len(ma[0]["mto_h"]) == TINY_DECODER["decoder_depth"] + 1


@pytest.mark.parametrize("objective", ["kmim", "mae", "beit"])
def test_loss_falls(dataset: Path, tmp_path: Path, objective: str) -> None:
    cfg = tiny(dataset, tmp_path / "run", objective=objective, batch_size=32, max_steps=30, epochs=5, lr=2e-3,
               warmup_steps=3, log_every=5, checkpoint_every=100)
    summary = train(cfg)
    assert summary["step"] == 30
    m = rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in m] == [5, 10, 15, 20, 25, 30]
    assert m[-1]["loss"] < 0.9 * m[0]["loss"], [r["loss"] for r in m]
    if objective != "mae":
        assert m[-1]["acc"] > m[0]["acc"]
    assert all(np.isfinite(r["grad_norm"]) and r["samples_per_s"] > 0 for r in m)


def test_non_finite_loss_stops_without_saving(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = engine.build_model

    def poisoned(cfg: TrainConfig, info: dict):
        model = build(cfg, info)
        forward, calls = model.forward, itertools.count()

        def nan_after_four(*args, **kwargs):
            out = forward(*args, **kwargs)
            if next(calls) >= 4:
                out["loss"] = out["loss"] * float("nan")
            return out

        model.forward = nan_after_four
        return model

    monkeypatch.setattr(engine, "build_model", poisoned)
    with pytest.raises(TrainError, match="step 5: non-finite"):
        train(tiny(dataset, tmp_path / "run", checkpoint_every=1, max_steps=8))
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.step == 4
    assert all(torch.isfinite(t).all() for t in load_file(ckpt.weights).values())


def test_run_directory_refusals(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(dataset, run, max_steps=1))
    with pytest.raises(TrainError, match="already holds a run"):
        train(tiny(dataset, run, max_steps=2))
    with pytest.raises(TrainError, match="field 'batch_size'"):
        train(tiny(dataset, run, max_steps=2, resume=True, batch_size=8))
    other = Path(shutil.copytree(dataset, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_id"] = "0" * 24
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match="tokenizer_id '0{24}' is not the"):
        train(tiny(other, run, max_steps=2, resume=True))
    assert latest_checkpoint(run).step == 1


@pytest.mark.parametrize(("override", "field"), [({"model_dim": 66}, "model_dim"), ({"mto_w_e": 1.0}, "mto_w_e"),
                                                 ({"mto_scale": True}, "mto_scale"),
                                                 ({"objective": "beit", "decoder_depth": 1}, "decoder_depth"),
                                                 ({"min_lr": 1.0}, "min_lr"), ({"accum_steps": 0}, "accum_steps")])
def test_config_errors_name_the_field(override: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_train_config(None, {"data": "d", "out": "o", **override})


def test_mto_scale_reaches_the_losses() -> None:
    cfg = load_train_config(None, {"data": "d", "out": "o", "mto": True, "mto_scale": True})
    assert cfg.mto_config().scale and not load_train_config(None, {"data": "d", "out": "o", "mto": True}
                                                             ).mto_config().scale
