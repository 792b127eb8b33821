"""Settings stated once: the CLI options come from the settings models, and so do the resume checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from pydantic import Field
from rich.text import Text
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import JobConfig, material_settings
from kmim.trainer import engine
from kmim.trainer.config import TrainConfig
from kmim.trainer.engine import TrainError, check_run_dir, write_run_config

cli = CliRunner()
# What changes no output of a job (all else is checked when it resumes): fixed here so a change is deliberate.
JOB_NOT_MATERIAL = {"out", "storage_options", "staging", "runner", "ray_address", "max_in_flight", "batch_size",
                    "assign", "feature_cache", "task_retries", "kmeans_workers", "decode_threads", "gpu_wait_s",
                    "device", "codebook"}
TRAIN_NOT_MATERIAL = {"data", "out", "max_steps", "workers", "verify", "device", "amp", "log_every",
                      "checkpoint_every", "resume", "sample_log"}


def options(command: str) -> dict[str, click.Parameter]:
    """The options of ``kmim <command>`` by their flags, joined by '/'."""
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {"/".join(p.opts + p.secondary_opts): p for p in params if p.name != "help"}


def test_every_setting_is_an_option_named_after_its_field() -> None:
    for command, model, own in [("run", JobConfig, {"--config", "--storage-option"}),
                                ("train", TrainConfig, {"--config"})]:
        found = options(command)
        settings = {n: f for n, f in model.model_fields.items() if n != "storage_options"}
        assert {o.split("/")[0] for o in found} == {f"--{n.replace('_', '-')}" for n in settings} | own
        booleans = {f"--{n.replace('_', '-')}/--no-{n.replace('_', '-')}" for n, f in settings.items()
                    if f.annotation in (bool, bool | None)}
        assert {o for o in found if "/" in o} == booleans
        assert all(p.default is None for p in found.values())  # not given: the YAML file or the model decides
    run = {flag: Text.from_markup(p.help).plain for flag, p in options("run").items()}  # help is rich markup
    assert run["--k"] == "codebook size [default: 50]" and run["--runner"].startswith("ray | local: ")
    assert run["--out"].endswith("(required here or in --config)") and "[default" not in run["--layer"]
    assert Text.from_markup(options("train")["--amp/--no-amp"].help).plain.endswith("[default: on]")


def test_options_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(engine, "train", lambda cfg: seen.append(cfg) or {})
    res = cli.invoke(app, ["train", "--data", "d", "--out", "o", "--lr", "0.01", "--no-amp", "--mto", "--mto-scale",
                           "--model", "small", "--checkpoint-every", "5"])
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert (cfg.lr, cfg.amp, cfg.mto_scale, cfg.model, cfg.checkpoint_every) == (0.01, False, True, "small", 5)
    assert cfg.verify and cfg.epochs == 1  # not given: the model's defaults
    res = cli.invoke(app, ["train", "--data", "d", "--out", "o", "--objective", "vit"])
    assert res.exit_code == 2 and "field 'objective'" in res.output


def test_job_material_settings() -> None:
    cfg = JobConfig(out="o")
    assert set(material_settings(cfg)) == set(JobConfig.model_fields) - JOB_NOT_MATERIAL
    assert list(material_settings(cfg)) == [n for n in JobConfig.model_fields if n not in JOB_NOT_MATERIAL]


def test_train_material_settings() -> None:
    assert set(material_settings(TrainConfig(data="d", out="o"))) == set(TrainConfig.model_fields) - TRAIN_NOT_MATERIAL


class WiderMLP(TrainConfig):
    """A TrainConfig with one more architecture setting, added the way a new one would be: one untagged line."""

    model_mlp_ratio: float = Field(4.0, gt=0, description="encoder MLP width / model width")


def test_a_new_architecture_setting_is_checked_on_resume(tmp_path: Path) -> None:
    info = {"tokenizer_id": "t"}
    write_run_config(WiderMLP(data="d", out=str(tmp_path)), info, world=1)
    check_run_dir(WiderMLP(data="d", out=str(tmp_path), resume=True, log_every=1, workers=2, max_steps=9), info)
    with pytest.raises(TrainError, match="field 'model_mlp_ratio' is 4.0 in .*, 2.0 now"):
        check_run_dir(WiderMLP(data="d", out=str(tmp_path), resume=True, model_mlp_ratio=2.0), info)
    with pytest.raises(TrainError, match="field 'lr'"):
        check_run_dir(WiderMLP(data="d", out=str(tmp_path), resume=True, lr=1e-2), info)


def test_the_command_line_exits_with_its_code_and_all_its_output(tmp_path: Path) -> None:
    # kmim.__main__ skips the interpreter's teardown: output through pipes still arrives whole, codes are kept
    kmim = [sys.executable, "-m", "kmim"]
    shown = subprocess.run([*kmim, "run", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--kmeans-epochs" in shown.stdout and shown.stdout.rstrip().endswith("╯")
    wrong = subprocess.run([*kmim, "run", "--no-such-option"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "No such option" in wrong.stderr
    refused = subprocess.run([*kmim, "run", "--out", str(tmp_path), "--k", "0"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and refused.stderr.endswith("greater than or equal to 2 (got 0)\n")
