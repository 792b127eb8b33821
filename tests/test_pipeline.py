"""End to end: kmim run (local and Ray), inputs of each kind, bad inputs, resume after a kill, verify."""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import class_image, job_overrides, png_bytes
from PIL import Image
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import ConfigError, load_config
from kmim.datasets.codebook import load_codebook
from kmim.datasets.manifest import read_index, read_manifest
from kmim.datasets.preprocess import Preprocess, decode_view
from kmim.datasets.shards import ShardWriter, decode_npy, iter_tar
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import JobError, run_job
from kmim.tokenizers.extractors import PixelExtractor

cli = CliRunner()


def run(out: Path, **kw) -> dict:
    return run_job(load_config(None, job_overrides(out=str(out), **kw)))


def shard_samples(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(iter_tar(f, str(path)))


def add_bad_files(folder: Path) -> dict[str, str]:
    d = folder / "class_0"
    good = png_bytes(np.full((40, 40, 3), 100, np.uint8))
    (d / "zero.png").write_bytes(b"")
    (d / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (d / "truncated.png").write_bytes(good[:70])
    Image.new("L", (3000, 3000)).save(d / "bomb.png")
    Image.new("RGB", (4, 50)).save(d / "tiny.png")
    Image.fromarray(np.zeros((40, 40, 4), np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(np.zeros((40, 40), np.uint16)).save(d / "deep.png")
    Image.new("CMYK", (40, 40)).save(d / "cmyk.jpg")
    Image.new("P", (40, 40)).save(d / "palette.png")
    return {"class_0/zero.png": "empty", "class_0/garbage.jpg": "undecodable", "class_0/truncated.png": "truncated",
            "class_0/bomb.png": "decompression_bomb", "class_0/tiny.png": "too_small"}


@pytest.mark.parametrize(("fit_images", "shard_size"), [(6, 200), (1000, 10)])
def test_a_local_job_decodes_each_image_once(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             fit_images: int, shard_size: int) -> None:
    """The images the fit sample decoded (the first 64 of one 85-input shard, or every 10-input shard) are not
    decoded again to be tokenized, and the shards are the bytes a job that decodes twice writes."""
    from kmim.pipeline import decoding, job

    add_bad_files(image_folder)
    rng = np.random.default_rng(3)
    for j in range(40):
        Image.fromarray(class_image(rng, 1, (36, 36))).save(image_folder / "class_1" / f"more_{j:02d}.png")
    calls: collections.Counter[str] = collections.Counter()
    real = decoding.decode_views

    def counted(data: bytes, pre: object, views: object, key: str, *args: object):
        calls[key] += 1
        return real(data, pre, views, key, *args)

    monkeypatch.setattr(decoding, "decode_views", counted)
    settings = {"input": str(image_folder), "fit_images": fit_images, "shard_size": shard_size,
                "max_image_pixels": 1_000_000}
    run(tmp_path / "once", **settings)
    once = dict(calls)
    calls.clear()
    monkeypatch.setattr(job, "LOCAL_KEEP_BYTES", 0)
    run(tmp_path / "twice", **settings)
    assert set(once.values()) == {1} and set(calls) == set(once)
    assert sum(calls.values()) >= len(once) + 10  # without keeping, the fit's images decode twice
    names = sorted(p.name for p in (tmp_path / "once").iterdir() if p.name != "job.json")
    assert names == sorted(p.name for p in (tmp_path / "twice").iterdir() if p.name != "job.json")
    for name in names:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes(), name


def test_local_run_end_to_end_with_bad_inputs(image_folder: Path, tmp_path: Path) -> None:
    expected = add_bad_files(image_folder)
    out = tmp_path / "out"
    summary = run(out, input=str(image_folder), max_image_pixels=1_000_000)
    manifest = read_manifest(out)
    assert manifest["inputs"] == 36 + 9 and manifest["samples"] == 36 + 4
    assert manifest["skipped"] == {"decompression_bomb": 1, "empty": 1, "too_small": 1, "truncated": 1,
                                   "undecodable": 1}
    assert summary["skipped"] == manifest["skipped"]
    assert manifest["labels"] == ["class_0", "class_1", "class_2"]
    assert manifest["token_grid"] == {"shape": [4, 4], "dtype": "uint16", "patch_size": 8}
    assert manifest["preprocess"]["image_size"] == 32
    assert all(set(e) >= {"path", "samples", "bytes", "sha256"} for e in manifest["shards"])
    statuses = {}
    for e in manifest["shards"]:
        index = read_index(out / e["index"]).to_pydict()
        statuses.update(zip(index["source"], index["status"], strict=True))
    assert {s: statuses[s] for s in expected} == expected
    assert sum(v == "ok" for v in statuses.values()) == 40
    assert verify_dataset(out) == []
    # every sample: image bytes as given, tokens = brute-force nearest centroid of its exact view, although the
    # default fit moved the centroids by the float32 top-1
    book = load_codebook(out / "codebook.safetensors")
    assert book.metadata["kmeans"]["fast_assign"] == ("torch" if torch.cuda.is_available() else "faiss")
    extractor = PixelExtractor(8)
    keys = set()
    for e in manifest["shards"]:
        for s in shard_samples(out / e["path"]):
            meta = json.loads(s["json"])
            ext = next(x for x in ("png", "jpg") if x in s)
            assert s[ext] == (image_folder / meta["source"]).read_bytes()
            view = decode_view(s[ext], Preprocess(32, render=manifest["preprocess"]["render"]))
            assert view.geometry == meta["view"]
            feats = extractor(torch.from_numpy(view.pixels.copy()).permute(2, 0, 1)[None])[0].reshape(-1, 192).double()
            ref = ((feats[:, None] - book.centroids.double()[None]) ** 2).sum(-1).argmin(1).reshape(4, 4)
            tokens = decode_npy(s["tokens.npy"])
            assert tokens.dtype == np.uint16 and np.array_equal(tokens, ref.numpy())
            keys.add(s["__key__"])
    assert len(keys) == 40
    # the CLI report
    res = cli.invoke(app, ["eval", "tokenizer", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["k"] == 8 and report["samples"] == 40 and 0 < report["utilization"] <= 1
    assert report["tcas"] is not None and report["perplexity"] > 1


def test_ray_runner_gives_the_same_dataset(image_folder: Path, tmp_path: Path, ray_local) -> None:
    run(tmp_path / "local", input=str(image_folder))
    summary = run(tmp_path / "ray", input=str(image_folder), runner="ray")
    assert summary["shards_written"] == 4
    assert read_manifest(tmp_path / "ray") == read_manifest(tmp_path / "local")


def test_deterministic_and_rerun_does_no_work(image_folder: Path, tmp_path: Path) -> None:
    # Decoding on one thread or several (ordered, decoded ahead) must not change a byte.
    a = run(tmp_path / "a", input=str(image_folder), decode_threads=1)
    b = run(tmp_path / "b", input=str(image_folder), decode_threads=3)
    assert a["tokenizer_id"] == b["tokenizer_id"]
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again = run(tmp_path / "a", input=str(image_folder), runner="local", batch_size=5)
    assert again["shards_written"] == 0 and not again["codebook_fitted"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before
    c = run(tmp_path / "c", input=str(image_folder), seed=1)
    assert c["tokenizer_id"] != a["tokenizer_id"]


def test_changed_settings_refuse_to_resume(image_folder: Path, tmp_path: Path) -> None:
    run(tmp_path / "o", input=str(image_folder))
    with pytest.raises(ConfigError, match="field 'k'"):
        run(tmp_path / "o", input=str(image_folder), k=9)


def test_tar_and_parquet_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [png_bytes(class_image(rng, i % 3, (40, 36))) for i in range(24)]
    tars = tmp_path / "tars"
    tars.mkdir()
    for t in range(2):
        w = ShardWriter(tars / f"part-{t}.tar")
        for i in range(t * 12, t * 12 + 12):
            w.write({"__key__": f"s{i:03d}", "png": images[i], "cls": str(i % 3).encode()})
        w.write({"__key__": f"nothing{t}", "txt": b"caption without an image"})
        w.finish()
        w.commit()
    summary = run(tmp_path / "from_tar", input=str(tars / "part-{0..1}.tar"))
    manifest = read_manifest(tmp_path / "from_tar")
    assert summary["shards"] == 2 and manifest["samples"] == 24 and manifest["skipped"] == {"no_image": 2}
    labels = [json.loads(s["json"])["label"] for s in shard_samples(tmp_path / "from_tar" / "shard-00000.tar")]
    assert labels == [i % 3 for i in range(12)]

    table = pa.table({"image": images, "label": [i % 3 for i in range(24)]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=7)
    run(tmp_path / "from_parquet", input=str(tmp_path / "data.parquet"), shard_size=10)
    manifest = read_manifest(tmp_path / "from_parquet")
    assert [e["samples"] for e in manifest["shards"]] == [10, 10, 4]
    sources = [json.loads(s["json"])["source"] for s in shard_samples(tmp_path / "from_parquet" / "shard-00001.tar")]
    assert sources == [f"data.parquet#{i}" for i in range(10, 20)]
    assert verify_dataset(tmp_path / "from_parquet") == []


def test_failed_shard_fails_job_without_manifest(tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    rng = np.random.default_rng(0)
    w = ShardWriter(tars / "a.tar")
    for i in range(16):
        w.write({"__key__": f"s{i}", "png": png_bytes(class_image(rng, 0, (32, 32)))})
    w.finish()
    w.commit()
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escape.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tars / "b.tar").write_bytes(evil.getvalue())
    with pytest.raises(JobError, match=r"b\.tar.*invalid member name"):
        run(tmp_path / "out", input=str(tars), fit_patches=100, fit_images=16)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert (tmp_path / "out" / "shard-00000.tar").exists()


def test_bad_config_fails_before_work_naming_the_field(tmp_path: Path) -> None:
    res = cli.invoke(app, ["run", "--out", str(tmp_path / "o"), "--k", "1"])
    assert res.exit_code == 2 and "'k'" in res.output
    res = cli.invoke(app, ["run", "--out", str(tmp_path / "o"), "--image-size", "30", "--patch-size", "16"])
    assert res.exit_code == 2 and "field 'image_size' (30) must be a multiple of field 'patch_size'" in res.output
    res = cli.invoke(app, ["run", "--out", str(tmp_path / "o"), "--runner", "spark"])
    assert res.exit_code == 2 and "'runner'" in res.output
    res = cli.invoke(app, ["run", "--out", str(tmp_path / "o"), "--input", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "field 'input'" in res.output
    assert not (tmp_path / "o").exists()
    cfg = tmp_path / "job.yaml"
    cfg.write_text("out: somewhere\nk: 64\nkmeans-epochs: 3\n")
    assert load_config(cfg, {"k": 32}).k == 32 and load_config(cfg).kmeans_epochs == 3
    cfg.write_text("out: somewhere\nkay: 64\n")
    with pytest.raises(ConfigError, match="field 'kay'"):
        load_config(cfg)


def test_verify_catches_corruption(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, input=str(image_folder))
    manifest = read_manifest(out)
    # flipped byte
    shard = out / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    assert any("shard-00001.tar: sha256" in p for p in verify_dataset(out))
    res = cli.invoke(app, ["verify", str(out)])
    assert res.exit_code == 1
    # missing shard
    shard.unlink()
    assert any("shard-00001.tar: missing" in p for p in verify_dataset(out))
    # out-of-range token, in a shard whose checksum is made to match again
    target = out / "shard-00002.tar"
    samples = shard_samples(target)
    grid = decode_npy(samples[0]["tokens.npy"]).copy()
    grid[0, 0] = 8  # K = 8
    buf = io.BytesIO()
    np.save(buf, grid)
    samples[0]["tokens.npy"] = buf.getvalue()
    w = ShardWriter(target)
    for s in samples:
        w.write(s)
    sha, size = w.finish()
    w.commit()
    entry = next(e for e in manifest["shards"] if e["path"] == "shard-00002.tar")
    entry.update(sha256=sha, bytes=size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_dataset(out)
    assert any("token 8 out of range for K=8" in p for p in problems)
    assert not any("shard-00002.tar: sha256" in p for p in problems)


def test_killed_job_resumes_to_the_same_manifest(tmp_path: Path) -> None:
    """A real SIGKILL mid-tokenize, then a rerun: same manifest as an uninterrupted run, no temp files."""
    args = ["--image-size", "64", "--patch-size", "8", "--k", "16", "--kmeans-epochs", "2", "--shard-size", "40",
            "--runner", "local", "--fit-patches", "5000"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kmim", "run", "--out", str(killed), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("shard-*.tar"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob("shard-*.tar")))
    assert 3 <= done < 45 and not (killed / "manifest.json").exists()
    res = cli.invoke(app, ["run", "--out", str(killed), *args])
    assert res.exit_code == 0, res.output
    clean = tmp_path / "clean"
    assert cli.invoke(app, ["run", "--out", str(clean), *args]).exit_code == 0
    assert read_manifest(killed) == read_manifest(clean)
    assert not list(killed.glob(".*tmp*"))
    assert verify_dataset(killed) == []


def test_feature_cache_reuses_fp16_features(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = run(tmp_path / "a", input=str(image_folder), feature_cache=str(cache))
    files = sorted(cache.glob("features-*.npy"))
    assert files and all(np.load(f, allow_pickle=False).dtype == np.float16 for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    b = run(tmp_path / "b", input=str(image_folder), feature_cache=str(cache))
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten
    assert a["tokenizer_id"] == b["tokenizer_id"]
    assert load_codebook(tmp_path / "b" / "codebook.safetensors").metadata["fit_feature_dtype"] == "float16"


def test_codebook_from_other_extractor_settings_is_refused(image_folder: Path, tmp_path: Path) -> None:
    from kmim.pipeline.sources import plan_inputs
    from kmim.pipeline.specs import source_spec, tokenize_stage

    run(tmp_path / "a", input=str(image_folder))
    cfg = load_config(None, job_overrides(out=str(tmp_path / "b"), input=str(image_folder), norm_pix=True))
    (tmp_path / "b").mkdir()
    stage = tokenize_stage(cfg, str(tmp_path / "a" / "codebook.safetensors"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="norm_pix"):
        stage(plan_inputs(source_spec(cfg))[0][0])


def test_fit_report_and_codebook_record_the_fit_assignment(image_folder: Path, tmp_path: Path) -> None:
    from kmim.pipeline.job import FIT_REPORT, fit_job

    for exact in (False, True):
        out = tmp_path / f"exact-{exact}"
        fit_job(load_config(None, job_overrides(out=str(out), input=str(image_folder), fit_exact=exact)))
        report = json.loads((out / FIT_REPORT).read_text())
        kmeans = load_codebook(out / "codebook.safetensors").metadata["kmeans"]
        # an exact fit's codebook records nothing new: it is the codebook kmim wrote before the fast fit existed
        assert kmeans.get("fast_assign", "exact") == report["fit_assign"]
        assert (report["fit_assign"] == "exact") == exact


@pytest.mark.parametrize("settings", [{}, {"norm_pix": True, "normalize": "none"}, {"views": 3, "patch_size": 4},
                                      {"fit_patches": 10**6}])  # the last draws every patch
def test_pixel_fit_sample_extracts_only_the_drawn_patches(image_folder: Path, tmp_path: Path, settings: dict) -> None:
    from kmim.pipeline.decoding import decoded, sample_key
    from kmim.pipeline.sources import plan_inputs
    from kmim.pipeline.specs import fit_sample, source_spec
    from kmim.tokenizers.extractors import build_extractor

    settings = {"fit_patches": 500, **settings}
    cfg = load_config(None, job_overrides(out=str(tmp_path), input=str(image_folder), **settings))
    sample = fit_sample(cfg, plan_inputs(source_spec(cfg))[0])
    stage, shard = sample.sampler, sample.shards[0]
    pairs = [(raw, v) for raw, v, _ in decoded(shard, stage.decode) if v is not None]
    views, keys = [v for _, v in pairs], [sample_key(raw.source) for raw, _ in pairs]
    extractor = build_extractor(stage.extractor)
    cut = stage._pixel_patches(extractor, views, keys)
    # the same values as the drawn patches' features in their whole views
    assert cut.shape[0] == len(views) * stage.patches and np.array_equal(cut, stage._features(extractor, views, keys))
    assert np.array_equal(stage(shard), cut)
