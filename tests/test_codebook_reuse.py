"""A tokenizer fitted once (kmim fit) and reused (kmim run --codebook): same shards, one tokenizer_id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import job_overrides, make_image_folder
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import ConfigError, load_config
from kmim.datasets.loader import LoaderError, common_tokenizer_id
from kmim.datasets.manifest import read_manifest
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import FIT_REPORT, fit_job, run_job

cli = CliRunner()


def _flags(**kw) -> list[str]:
    """Command-line flags of the test job settings ``job_overrides(**kw)``."""
    return [arg for key, value in job_overrides(**kw).items() for arg in ("--" + key.replace("_", "-"), str(value))]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image folder, its codebook from kmim fit, and one plain kmim run with the same settings."""
    tmp = tmp_path_factory.mktemp("reuse")
    images = make_image_folder(tmp / "images")
    result = cli.invoke(app, ["fit", *_flags(input=str(images), out=str(tmp / "book"))])
    assert result.exit_code == 0, result.output
    assert run_job(load_config(None, job_overrides(input=str(images), out=str(tmp / "plain"))))["codebook_fitted"]
    return {"images": images, "book": tmp / "book", "plain": tmp / "plain", "tmp": tmp}


def test_fit_then_run_matches_one_run(fitted: dict[str, Path]) -> None:
    book = fitted["book"]
    assert sorted(p.name for p in book.iterdir() if not p.name.startswith(".")) == [
        "codebook.safetensors", FIT_REPORT, "job.json"]
    report = json.loads((book / FIT_REPORT).read_text())
    assert len(report["history"]) == job_overrides()["kmeans_epochs"]
    out = fitted["tmp"] / "reused"
    result = cli.invoke(app, ["run", "--input", str(fitted["images"]), "--out", str(out), "--codebook", str(book),
                              "--runner", "local", "--shard-size", "10", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    plain = fitted["plain"]
    assert read_manifest(out)["tokenizer_id"] == read_manifest(plain)["tokenizer_id"] == report["tokenizer_id"]
    tars = sorted(p.name for p in plain.glob("shard-*.tar"))
    assert tars and tars == sorted(p.name for p in out.glob("shard-*.tar"))
    for name in [*tars, "codebook.safetensors"]:
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    assert verify_dataset(str(out)) == []


def test_shared_codebook_and_common_tokenizer_id(fitted: dict[str, Path]) -> None:
    tmp = fitted["tmp"]
    other = make_image_folder(tmp / "other_images", per_class=5, seed=1)
    second = tmp / "second"
    summary = run_job(load_config(None, job_overrides(input=str(other), out=str(second),
                                                      codebook=str(fitted["book"] / "codebook.safetensors"))))
    assert not summary["codebook_fitted"]
    tid = common_tokenizer_id([str(fitted["plain"]), str(second)])
    assert tid == read_manifest(second)["tokenizer_id"]
    foreign = tmp / "foreign"
    run_job(load_config(None, job_overrides(input=str(other), out=str(foreign), seed=1)))
    with pytest.raises(LoaderError, match="foreign"):
        common_tokenizer_id([str(fitted["plain"]), str(second), str(foreign)])


@pytest.mark.parametrize(("flag", "value", "field"), [("--k", "9", "k"), ("--patch-size", "4", "patch_size"),
                                                      ("--image-size", "64", "image_size"),
                                                      ("--normalize", "none", "normalize")])
def test_conflicting_flags_refused(fitted: dict[str, Path], flag: str, value: str, field: str) -> None:
    out = fitted["tmp"] / f"conflict-{field}"
    result = cli.invoke(app, ["run", "--input", str(fitted["images"]), "--out", str(out), "--codebook",
                              str(fitted["book"]), "--runner", "local", flag, value])
    assert result.exit_code == 2, result.output
    assert f"field '{field}'" in result.output
    assert not out.exists()  # refused before any work


def test_seed_ignored_and_conflict_in_api(fitted: dict[str, Path]) -> None:
    """seed only drives a fit (and random views): with --codebook it is no conflict; the API refuses like the CLI."""
    cfg = job_overrides(input=str(fitted["images"]), codebook=str(fitted["book"]))
    with pytest.raises(ConfigError, match="field 'k'"):
        run_job(load_config(None, {**cfg, "out": str(fitted["tmp"] / "api"), "k": 9}))
    summary = run_job(load_config(None, {**cfg, "out": str(fitted["tmp"] / "seeded"), "seed": 7}))
    assert summary["tokenizer_id"] == read_manifest(fitted["plain"])["tokenizer_id"]


def test_fit_resumes(fitted: dict[str, Path]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in fitted["book"].iterdir()}
    summary = fit_job(load_config(None, job_overrides(input=str(fitted["images"]), out=str(fitted["book"]))))
    assert not summary["codebook_fitted"]
    assert {p.name: p.stat().st_mtime_ns for p in fitted["book"].iterdir()} == before


def test_learned_codebook_reused_weights_checked(tmp_path: Path) -> None:
    """A dino codebook: the model, layer, normalization and geometry come from it; the weights file must be given
    (the codebook records its digest, not its path), and another file is refused naming 'weights'."""
    from test_learned_extractors import VIT16, save_tiny

    images = make_image_folder(tmp_path / "images", per_class=4)
    path = save_tiny(tmp_path / "w.safetensors", VIT16)
    learned = {"extractor": "dino", "model": VIT16[1], "model_kwargs": json.dumps(VIT16[2]), "weights": str(path),
               "normalize": "l2", "fit_patches": 384, "shard_size": 6}
    plain = run_job(load_config(None, job_overrides(input=str(images), out=str(tmp_path / "plain"), **learned)))
    fit_job(load_config(None, job_overrides(input=str(images), out=str(tmp_path / "book"), **learned)))
    reuse = {"input": str(images), "codebook": str(tmp_path / "book"), "extractor": "dino", "shard_size": 6}
    reused = run_job(load_config(None, job_overrides(out=str(tmp_path / "reused"), weights=str(path), **reuse)))
    assert reused["tokenizer_id"] == plain["tokenizer_id"] and not reused["codebook_fitted"]
    for tar in sorted((tmp_path / "plain").glob("shard-*.tar")):
        assert (tmp_path / "reused" / tar.name).read_bytes() == tar.read_bytes()
    other = save_tiny(tmp_path / "other.safetensors", VIT16, seed=1)
    with pytest.raises(ConfigError, match="field 'weights'"):
        run_job(load_config(None, job_overrides(out=str(tmp_path / "other"), weights=str(other), **reuse)))
    assert not (tmp_path / "other").exists()


def test_missing_codebook_and_fit_with_codebook_refused(fitted: dict[str, Path]) -> None:
    tmp = fitted["tmp"]
    with pytest.raises(ConfigError, match="field 'codebook'"):
        run_job(load_config(None, job_overrides(out=str(tmp / "none"), codebook=str(tmp / "missing"))))
    with pytest.raises(ConfigError, match="field 'codebook'"):
        fit_job(load_config(None, job_overrides(out=str(tmp / "none"), codebook=str(fitted["book"]))))
    result = cli.invoke(app, ["fit", "--out", str(tmp / "none"), "--codebook", str(fitted["book"])])
    assert result.exit_code == 2  # kmim fit has no --codebook option
