"""`kmim train` + `kmim eval linprobe` end to end on digits, and the probe's split, head and k-NN pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import TINY, TINY_DECODER, digits_dataset
from typer.testing import CliRunner

from kmim.cli import app
from kmim.trainer.linprobe import ProbeConfig, knn_top1, split_by_key, train_linear


def flags(settings: dict) -> list[str]:
    return [item for k, v in settings.items() for item in (f"--{k.replace('_', '-')}", str(v))]


def test_train_cli_then_linprobe_json_beats_chance(tmp_path: Path) -> None:
    data = digits_dataset(tmp_path, per_class=40)
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--objective", "kmim",
                                 "--batch-size", "32", "--epochs", "1", "--lr", "2e-3", "--log-every", "4",
                                 *flags(TINY), *flags(TINY_DECODER)])
    assert result.exit_code == 0, result.output
    assert (run / "curves.png").stat().st_size > 0 and (run / "metrics.jsonl").exists()

    result = runner.invoke(app, ["eval", "linprobe", "--checkpoint", str(run), "--data", str(data), "--json",
                                 "--epochs", "30"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["checkpoint_step"] == 12 and report["classes"] == 10
    assert report["train_samples"] + report["test_samples"] == 400
    for key in ("top1", "knn_top1"):
        assert 0.0 <= report[key] <= 1.0
        assert report[key] > 0.25, report  # chance is 0.1

    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "bad"), "--model-dim", "66"])
    assert result.exit_code == 2 and "model_dim" in result.output
    result = runner.invoke(app, ["eval", "linprobe", "--checkpoint", str(tmp_path), "--data", str(data)])
    assert result.exit_code == 1 and "not a kmim run directory" in result.output


def test_split_by_key_is_a_stable_function_of_the_key() -> None:
    keys = [f"sample-{i:05d}" for i in range(4000)]
    train = split_by_key(keys, 0.8, seed=0)
    assert 0.77 < train.float().mean() < 0.83
    shuffled = list(reversed(keys))
    assert torch.equal(split_by_key(shuffled, 0.8, seed=0), train.flip(0))
    assert not torch.equal(split_by_key(keys, 0.8, seed=1), train)


def test_linear_head_and_knn_on_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=gen) * 0.5 + 10.0  # offset: BatchNorm must center it
    train = torch.arange(400) < 300
    head = train_linear(x[train], y[train], 4, ProbeConfig(epochs=20, batch_size=64))
    with torch.no_grad():
        assert (head(x[~train]).argmax(1) == y[~train]).float().mean() == 1.0
    assert knn_top1(x[train], y[train], x[~train], y[~train], 4, k=20) == 1.0


def test_probe_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        ProbeConfig(train_fraction=1.0)
    with pytest.raises(ValueError, match="knn_k"):
        ProbeConfig(knn_k=0)
