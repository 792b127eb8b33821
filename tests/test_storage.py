"""Object storage: kmim run / publish / verify against a real S3 endpoint (moto's server) on 127.0.0.1.

Faults are injected by wrapping s3fs's upload call at test time; the server, the uploads and the reads are real.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import s3fs
import torch
from botocore.exceptions import ClientError
from conftest import job_overrides, make_image_folder, moto_s3
from typer.testing import CliRunner

from kmim import storage
from kmim.cli import app
from kmim.config import load_config
from kmim.datasets.loader import TokenDataset
from kmim.datasets.manifest import read_manifest
from kmim.datasets.verify import verify_dataset
from kmim.pipeline import stages
from kmim.pipeline.job import JobError, run_job
from kmim.pipeline.publish import PublishError, publish

cli = CliRunner()
SECRET = "kmim-test-secret-" + uuid.uuid4().hex  # must never show up anywhere


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3(SECRET) as url, pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "BACKOFF_S", 0.01)
        yield url


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def local_dataset(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same job written to a local directory (4 shards)."""
    out = tmp_path_factory.mktemp("local") / "ds"
    run_job(load_config(None, job_overrides(out=str(out), input=str(images))))
    return out


def run(out: str, images: Path, staging: Path, **kw) -> dict:
    return run_job(load_config(None, job_overrides(out=out, input=str(images), staging=str(staging), **kw)))


def inject(monkeypatch: pytest.MonkeyPatch, fault: Callable[[str, int, str], str]) -> Counter:
    """Route every S3 upload through ``fault(file name, attempt, local path)``, which may raise or return another
    local file to upload instead; returns the upload count per file name."""
    real = s3fs.S3FileSystem._put_file
    calls: Counter = Counter()

    async def put_file(self, lpath, rpath, *args, **kwargs):
        name = rpath.rsplit("/", 1)[-1]
        calls[name] += 1
        return await real(self, fault(name, calls[name], lpath), rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put_file)
    s3fs.S3FileSystem.clear_instance_cache()  # sync methods are bound when an instance is made
    return calls


def remote_names(url: str) -> set[str]:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.ls(url.removeprefix("s3://"))}


def test_ray_run_to_s3_then_verify_and_load(bucket: str, images: Path, local_dataset: Path, tmp_path: Path,
                                            endpoint: str, ray_local, caplog: pytest.LogCaptureFixture) -> None:
    """Ray workers upload their own shards (options given on the command line, so they need no environment);
    no credential reaches the output, the staging directory, the log or the console."""
    caplog.set_level(logging.INFO)
    url = f"{bucket}/ds"
    cfg = job_overrides(input=str(images), runner="ray")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    opts = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", "key=kmim-test-key",
            "--storage-option", f"secret={SECRET}"]
    res = cli.invoke(app, ["run", "--out", url, "--staging", str(tmp_path / "stage"), *opts, *args])
    assert res.exit_code == 0, res.output
    assert read_manifest(url.removeprefix("s3://"), s3fs.S3FileSystem()) == read_manifest(local_dataset)
    assert remote_names(url) == {p.name for p in local_dataset.iterdir()}
    res2 = cli.invoke(app, ["verify", url])  # endpoint and credentials from the environment
    assert res2.exit_code == 0 and "OK" in res2.output, res2.output
    stored = s3fs.S3FileSystem()
    for name in ("job.json", "manifest.json"):
        assert SECRET not in stored.cat_file(f"{url}/{name}").decode()
    assert all(SECRET.encode() not in p.read_bytes() for p in (tmp_path / "stage").rglob("*") if p.is_file())
    assert SECRET not in res.output + res2.output + caplog.text

    remote = TokenDataset(url, batch_size=6, shuffle=False, cache_dir=tmp_path / "cache")
    local = TokenDataset(local_dataset, batch_size=6, shuffle=False)
    a, b = next(iter(remote.batches(0))), next(iter(local.batches(0)))
    assert a["key"] == b["key"] and torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["image"], b["image"])


def test_multi_view_run_to_s3_matches_a_local_one(bucket: str, images: Path, tmp_path: Path) -> None:
    """``--views`` through the command line to an object store: the same shards as a local run, verified, and the
    loader's random views read back the same."""
    cfg = job_overrides(input=str(images), views=3, view_scale="0.3,0.9")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    url = f"{bucket}/views"
    for out in (url, str(tmp_path / "local")):
        res = cli.invoke(app, ["run", "--out", out, "--staging", str(tmp_path / "stage"), *args])
        assert res.exit_code == 0, res.output
    manifest = read_manifest(url.removeprefix("s3://"), s3fs.S3FileSystem())
    assert manifest == read_manifest(tmp_path / "local") and manifest["views"]["scale"] == [0.3, 0.9]
    assert verify_dataset(url) == []
    remote = TokenDataset(url, batch_size=6, cache_dir=tmp_path / "cache")
    local = TokenDataset(tmp_path / "local", batch_size=6)
    for a, b in zip(remote.batches(0), local.batches(0), strict=True):
        assert torch.equal(a["view"], b["view"]) and torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["image"], b["image"])


def test_transient_errors_and_corrupt_uploads_are_retried(bucket: str, images: Path, local_dataset: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not the shard")

    def fault(name: str, attempt: int, lpath: str) -> str:
        if name == "shard-00001.tar" and attempt <= 2:
            raise OSError(errno.EIO, "connection reset by peer")
        if name == "shard-00002.tar" and attempt == 1:
            return str(garbage)  # lands under the final name; the read-back check must catch and delete it
        if name == "codebook.safetensors" and attempt == 1:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        return lpath

    calls = inject(monkeypatch, fault)
    url = f"{bucket}/ds"
    run(url, images, tmp_path / "stage")
    assert calls["shard-00001.tar"] == 3 and calls["shard-00002.tar"] == 2 and calls["codebook.safetensors"] == 2
    assert calls["shard-00000.tar"] == 1
    assert read_manifest(url.removeprefix("s3://"), s3fs.S3FileSystem()) == read_manifest(local_dataset)
    assert verify_dataset(url) == []


def test_permanent_upload_failure_fails_the_job_without_manifest(bucket: str, images: Path, local_dataset: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def fault(name: str, attempt: int, lpath: str) -> str:
        if name == "shard-00002.tar":
            raise PermissionError("Access Denied")
        return lpath

    calls = inject(monkeypatch, fault)
    url = f"{bucket}/ds"
    with pytest.raises(JobError, match=r"shard-00002\.tar.*Access Denied"):
        run(url, images, tmp_path / "stage")
    assert calls["shard-00002.tar"] == 1  # a permission error is not retried
    names = remote_names(url)
    assert "manifest.json" not in names and "shard-00002.tar" not in names and "shard-00003.tar" in names
    assert "manifest" in verify_dataset(url)[0]
    assert not list((tmp_path / "stage").glob("shard-*"))  # staged files go even when the upload fails


def test_run_resumes_against_remote_out_after_a_crash(bucket: str, images: Path, local_dataset: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted between a shard's index and its tar upload, with leftovers in staging: the rerun redoes only the
    missing shards and commits the manifest an uninterrupted run commits."""
    stage = tmp_path / "stage"

    real = stages.put_verified

    def killed_at_shard_2_tar(local: Path, fs, path: str, **kw) -> None:
        if path.endswith("shard-00002.tar"):
            raise KeyboardInterrupt  # the process stops here; the index went up, the tar never does
        real(local, fs, path, **kw)

    url = f"{bucket}/ds"
    with monkeypatch.context() as mp:
        mp.setattr(stages, "put_verified", killed_at_shard_2_tar)
        with pytest.raises(KeyboardInterrupt):
            run(url, images, stage)
    names = remote_names(url)
    assert {"shard-00000.tar", "shard-00001.tar", "shard-00002.index.parquet"} <= names
    assert "shard-00002.tar" not in names and "manifest.json" not in names
    (stage / ".shard-00003.tar.tmp-deadbeef").write_bytes(b"half a tar")  # as left by a killed worker
    (stage / "shard-00002.tar").write_bytes(b"staged, never uploaded")

    calls = inject(monkeypatch, lambda name, attempt, lpath: lpath)
    summary = run(url, images, stage)
    assert summary["shards_written"] == 2 and not summary["codebook_fitted"]
    assert set(calls) == {"shard-00002.index.parquet", "shard-00002.tar", "shard-00003.index.parquet",
                          "shard-00003.tar", "manifest.json"}
    assert read_manifest(url.removeprefix("s3://"), s3fs.S3FileSystem()) == read_manifest(local_dataset)
    assert not list(stage.glob(".*tmp*")) and not list(stage.glob("shard-*"))
    assert verify_dataset(url) == []


def test_publish_resumes_after_an_interrupted_upload(bucket: str, local_dataset: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def link_down(name: str, attempt: int, lpath: str) -> str:
        if name == "shard-00003.tar":
            raise ConnectionError("link down")
        return lpath

    url = f"{bucket}/published"
    with monkeypatch.context() as mp:
        inject(mp, link_down)
        with pytest.raises(PublishError, match=r"(?s)1 of 10 files failed; no manifest.*shard-00003\.tar.*link down"):
            publish(local_dataset, url)
    s3fs.S3FileSystem.clear_instance_cache()
    assert "manifest.json" not in remote_names(url)
    fs = s3fs.S3FileSystem()
    key = f"{url}/shard-00001.tar".removeprefix("s3://")
    fs.pipe_file(key, fs.cat_file(key)[:1000])  # a partial object where a shard should be

    calls = inject(monkeypatch, lambda name, attempt, lpath: lpath)
    summary = publish(local_dataset, url)
    assert set(calls) == {"shard-00001.tar", "shard-00003.tar", "manifest.json"}  # the rest was already there
    assert summary["files"] == 11 and summary["files_uploaded"] == 3
    res = cli.invoke(app, ["verify", url])
    assert res.exit_code == 0, res.output
    assert fs.cat_file(f"{url}/manifest.json".removeprefix("s3://")) == (local_dataset / "manifest.json").read_bytes()
    assert publish(local_dataset, url)["files_uploaded"] == 0  # idempotent


def test_publish_refuses_what_is_not_a_committed_dataset(bucket: str, local_dataset: Path, tmp_path: Path) -> None:
    src = tmp_path / "uncommitted"
    shutil.copytree(local_dataset, src)
    (src / "manifest.json").unlink()
    res = cli.invoke(app, ["publish", str(src), f"{bucket}/x"])
    assert res.exit_code == 1 and "no manifest" in res.output
    assert not remote_names(bucket)
    shutil.copytree(local_dataset, src, dirs_exist_ok=True)
    data = bytearray((src / "shard-00001.tar").read_bytes())
    data[600] ^= 1
    (src / "shard-00001.tar").write_bytes(bytes(data))
    with pytest.raises(PublishError, match=r"shard-00001\.tar.*differs from the source manifest"):
        publish(src, f"{bucket}/x")
    publish(local_dataset, f"{bucket}/y")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["kmim_version"] = "0.0.0"
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PublishError, match="already holds another dataset"):
        publish(src, f"{bucket}/y")


def test_publish_to_a_local_directory(local_dataset: Path, tmp_path: Path) -> None:
    """Filesystems without atomic object PUTs get a temporary name, renamed once checked."""
    dest = tmp_path / "copy"
    res = cli.invoke(app, ["publish", str(local_dataset), f"file://{dest}", "--workers", "3"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in local_dataset.iterdir())
    assert verify_dataset(dest) == []


def test_transient_or_permanent() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(client_error("SlowDown", 503))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    translated = PermissionError("Access Denied")
    translated.__cause__ = client_error("AccessDenied", 403)
    assert not storage.is_transient(translated)
    assert storage.is_transient(ConnectionResetError()) and storage.is_transient(TimeoutError())
    assert not storage.is_transient(FileNotFoundError()) and not storage.is_transient(ValueError())


def test_storage_option_values_are_never_echoed(tmp_path: Path) -> None:
    res = cli.invoke(app, ["verify", str(tmp_path), "--storage-option", SECRET])
    assert res.exit_code == 2 and "key=value" in res.output and SECRET not in res.output
    assert storage.redact("ftp://user:pw@host/x") == "ftp://***@host/x"
