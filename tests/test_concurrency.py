"""Outputs shared by accident: foreign shards never commit, and one ``kmim run`` at a time per output (a flock on a
local directory, a lease object in S3, against moto's server on 127.0.0.1). Real files, real processes."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from conftest import job_overrides, make_image_folder, moto_s3

from kmim.config import load_config
from kmim.datasets.manifest import build_manifest, read_manifest, write_manifest
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import run_job
from kmim.pipeline.lock import LEASE_FILE, LOCK_FILE, LockError, hold_output
from kmim.pipeline.publish import publish
from kmim.storage import open_url

SECRET = "kmim-test-secret-" + uuid.uuid4().hex  # must never show up in a lock or lease
# Holds the output named by argv[1] until its stdin closes; prints "held" once it does.
HOLD = """
import sys
from kmim.pipeline.lock import hold_output
from kmim.storage import open_url
with hold_output(*open_url(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def run(out: Path | str, images: Path, **kw) -> dict:
    return run_job(load_config(None, job_overrides(out=str(out), input=str(images), **kw)))


@pytest.fixture(scope="module")
def datasets(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ours, theirs): the same inputs and K, tokenized with two codebooks (another seed)."""
    root = tmp_path_factory.mktemp("datasets")
    ours, theirs = run(root / "ours", images), run(root / "theirs", images, seed=1)
    assert ours["tokenizer_id"] != theirs["tokenizer_id"]
    return root / "ours", root / "theirs"


def copy_in_foreign_shard(datasets: tuple[Path, Path], dest: Path, shard: str = "shard-00001") -> Path:
    """A copy of our dataset in ``dest`` with one of their shards (tar + index) copied over ours."""
    shutil.copytree(datasets[0], dest)
    for ext in (".tar", ".index.parquet"):
        shutil.copy2(datasets[1] / (shard + ext), dest / (shard + ext))
    return dest


def start_holder(url: str, *argv: str, **env: str) -> subprocess.Popen:
    """A real process holding ``url`` (``argv`` only shows up in its command line); returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, url, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    assert proc.stdout.readline() == "held\n", proc.communicate()[1]
    return proc


def cli_run(out: str, images: Path, **kw) -> subprocess.CompletedProcess:
    """``kmim run`` in a new process."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in job_overrides(input=str(images), **kw).items()]
    return subprocess.run([sys.executable, "-m", "kmim", "run", "--out", out, *args], capture_output=True,
                          text=True, timeout=120)


def error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    return lines[0]


def test_foreign_or_broken_shards_are_redone(datasets: tuple[Path, Path], images: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A shard from another codebook, one without its index and one with a garbage index: the rerun redoes
    exactly those and commits the manifest of the untouched dataset."""
    out = copy_in_foreign_shard(datasets, tmp_path / "out")
    (out / "shard-00002.index.parquet").unlink()
    (out / "shard-00003.index.parquet").write_bytes(b"not parquet")
    caplog.set_level(logging.WARNING, "kmim")
    summary = run(out, images)
    assert summary["shards_written"] == 3 and not summary["codebook_fitted"]
    assert read_manifest(out) == read_manifest(datasets[0])
    assert verify_dataset(out) == []
    assert "shard-00001.tar: its tokenizer_id is" in caplog.text
    assert "shard-00002.tar: its index is missing; redoing it" in caplog.text
    assert "shard-00003.tar: its index is unreadable" in caplog.text
    assert "shard-00000.tar" not in caplog.text


def test_manifest_and_verify_refuse_a_foreign_shard(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    out = copy_in_foreign_shard(datasets, tmp_path / "out")
    manifest = read_manifest(out)
    dataset = {k: manifest[k] for k in ("tokenizer_id", "codebook", "token_grid", "preprocess", "labels")}
    with pytest.raises(ValueError, match=r"shard-00001\.tar was tokenized with tokenizer_id .*refusing"):
        build_manifest(out, [e["path"] for e in manifest["shards"]], dataset=dataset)
    # A manifest listing the foreign shard as it is (what a manifest rebuilt from index stats used to say).
    theirs = read_manifest(datasets[1])["shards"][1]
    assert theirs["samples"] == manifest["shards"][1]["samples"]
    manifest["shards"][1] = theirs
    write_manifest(out, manifest)
    problems = verify_dataset(out)
    assert len(problems) == 1 and "shard-00001.index.parquet: tokenizer_id" in problems[0], problems
    assert "shard-00001.tar was tokenized with another codebook" in problems[0]


def test_second_local_run_fails_at_once_and_leaves_the_output_alone(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    in_flight = out / ".shard-00000.tar.tmp-0123abcd"  # the holder's temporary file, which a sweep would delete
    in_flight.write_bytes(b"half a shard")
    with hold_output(*open_url(str(out))):
        holder = json.loads((out / LOCK_FILE).read_text())
        line = error_line(cli_run(str(out), images))
    assert f"is in use by another kmim run: pid {os.getpid()} on host {socket.gethostname()} since " \
           f"{holder['since']}" in line
    assert in_flight.exists() and not (out / "job.json").exists() and not (out / "codebook.safetensors").exists()
    assert not (out / LOCK_FILE).exists()  # released


def test_a_killed_holders_lock_is_taken_over_and_stays_out_of_the_dataset(datasets: tuple[Path, Path],
                                                                          images: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(datasets[0], out)
    holder = start_holder(str(out))
    with pytest.raises(LockError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
        run(out, images)
    assert verify_dataset(out) == []  # the lock file is no part of the dataset
    publish(out, str(tmp_path / "published"))
    assert not (tmp_path / "published" / LOCK_FILE).exists()
    holder.kill()
    holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind, no longer locked
    caplog.set_level(logging.INFO, "kmim")
    assert run(out, images)["shards_written"] == 0
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()


def test_a_lock_file_unlinked_before_it_is_locked_is_not_held(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous holder unlinks the file between our open and our flock: we must lock the file now at the
    path, not the orphan, or a third run would lock the new file too."""
    real = fcntl.flock
    locked: list[int] = []

    def flock(fd: int, op: int) -> None:
        if not locked:
            (tmp_path / LOCK_FILE).unlink()  # the previous holder's release
        locked.append(fd)
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with hold_output(*open_url(str(tmp_path))):
        assert len(locked) == 2
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                real(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    def flock_failing_with(code: int):
        def flock(fd: int, op: int) -> None:
            raise OSError(code, os.strerror(code))
        return flock

    monkeypatch.setattr(fcntl, "flock", flock_failing_with(errno.ENOLCK))
    with hold_output(*open_url(str(tmp_path))):
        pass
    assert "this filesystem has no flock (No locks available); running unlocked" in caplog.text
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(errno.EACCES))  # any other error stops the run
    with pytest.raises(PermissionError), hold_output(*open_url(str(tmp_path))):
        pass


def test_a_lease_without_conditional_writes(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """fsspec's memory filesystem: check-then-write, no ETags; still one holder at a time, taken over when stale."""
    monkeypatch.setenv("KMIM_LEASE_TTL_S", "0.3")
    fs, root = open_url(f"memory://kmim-{uuid.uuid4().hex}")
    lease = f"{root}/{LEASE_FILE}"
    with hold_output(fs, root):
        first = json.loads(fs.cat_file(lease))
        with pytest.raises(LockError, match=f"pid {os.getpid()} on host"), hold_output(fs, root):
            pass
        time.sleep(0.5)
        assert json.loads(fs.cat_file(lease))["renewed"] > first["renewed"]
    assert not fs.exists(lease)
    gone = {"pid": 1, "host": "elsewhere", "since": "2020-01-01T00:00:00+00:00", "renewed": time.time() - 60,
            "ttl_s": 30, "token": "theirs", "command": "kmim run"}
    fs.pipe_file(lease, json.dumps(gone).encode())
    with hold_output(fs, root):
        assert json.loads(fs.cat_file(lease))["pid"] == os.getpid()
    assert "taking over the lease of pid 1 on host elsewhere" in caplog.text and "not renewed for 60s" in caplog.text
    assert not fs.exists(lease)


def test_a_bad_lease_ttl_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("0", "-5", "ten", "nan", "inf"):
        monkeypatch.setenv("KMIM_LEASE_TTL_S", bad)
        with pytest.raises(ValueError, match=f"KMIM_LEASE_TTL_S='{bad}' is not a positive number of seconds"), \
                hold_output(*open_url("memory://kmim-ttl")):
            pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3("kmim-test-secret") as url:
        yield url


def lease_of(url: str) -> dict | None:
    fs = s3fs.S3FileSystem()
    try:
        return json.loads(fs.cat_file(f"{url}/{LEASE_FILE}".removeprefix("s3://")))
    except FileNotFoundError:
        return None


def test_second_s3_run_fails_at_once_naming_the_lease_holder(bucket: str, images: Path, tmp_path: Path,
                                                             datasets: tuple[Path, Path]) -> None:
    url = f"{bucket}/ds"
    holder = start_holder(url, "--storage-option", f"secret={SECRET}", f"--storage-option=token={SECRET}")
    lease = lease_of(url)
    assert lease["pid"] == holder.pid and lease["host"] == socket.gethostname() and lease["ttl_s"] == 600
    assert SECRET not in json.dumps(lease) and "secret=*** --storage-option=token=***" in lease["command"]
    line = error_line(cli_run(url, images, staging=str(tmp_path / "stage")))
    assert f"{url} is in use by another kmim run: pid {holder.pid} on host {socket.gethostname()} since " \
           f"{lease['since']}" in line and "renewed" in line
    s3 = s3fs.S3FileSystem()
    assert s3.ls(url.removeprefix("s3://")) == [f"{url}/{LEASE_FILE}".removeprefix("s3://")]  # nothing else
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    assert lease_of(url) is None  # released
    run(url, images, staging=str(tmp_path / "stage"))
    assert lease_of(url) is None and verify_dataset(url) == []
    for name in ("shard-00001.tar", "shard-00001.index.parquet"):  # a foreign shard, in S3 this time
        s3.put_file(str(datasets[1] / name), f"{url}/{name}".removeprefix("s3://"))
    assert run(url, images, staging=str(tmp_path / "stage"))["shards_written"] == 1
    assert read_manifest(url.removeprefix("s3://"), s3) == read_manifest(datasets[0])


def test_a_hung_holders_lease_is_taken_over_after_its_ttl(bucket: str) -> None:
    """A holder that stops renewing (SIGSTOP: alive, not dead) loses its lease after its TTL; once it runs again
    it notices, and its release leaves the new holder's lease alone."""
    url = f"{bucket}/ds"
    hung = start_holder(url, KMIM_LEASE_TTL_S="1.5")
    first = lease_of(url)
    time.sleep(1.0)
    assert lease_of(url)["renewed"] > first["renewed"]  # renewed every ttl / 3
    with pytest.raises(LockError, match=f"pid {hung.pid} on host"), hold_output(*open_url(url)):
        pass
    hung.send_signal(signal.SIGSTOP)
    time.sleep(2.0)
    with hold_output(*open_url(url)):
        assert lease_of(url)["pid"] == os.getpid()
        hung.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # its renewal tick finds the lease taken
        hung.stdin.close()
        assert hung.wait(timeout=30) == 0
        assert lease_of(url)["pid"] == os.getpid()
    assert "this run lost its lease" in hung.stderr.read()
    assert lease_of(url) is None


def test_a_killed_runs_lease_is_taken_over_at_once_on_its_host(bucket: str, images: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    url = f"{bucket}/ds"
    dead = start_holder(url)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert lease_of(url)["pid"] == dead.pid  # its default TTL is 10 minutes
    caplog.set_level(logging.WARNING, "kmim")
    assert run(url, images, staging=str(tmp_path / "stage"))["shards_written"] == 4
    assert f"taking over the lease of pid {dead.pid}" in caplog.text and "is gone from this host" in caplog.text
    assert lease_of(url) is None and verify_dataset(url) == []


def test_a_run_that_lost_its_lease_does_not_commit(bucket: str) -> None:
    """A holder paused past its TTL loses the lease to another run; its confirm() before the commit refuses."""
    url = f"{bucket}/ds"
    with hold_output(*open_url(url)) as confirm:
        confirm()  # still ours
        taken = {**lease_of(url), "token": uuid.uuid4().hex, "pid": 1, "host": "elsewhere"}
        s3fs.S3FileSystem().pipe_file(f"{url}/{LEASE_FILE}".removeprefix("s3://"), json.dumps(taken).encode())
        with pytest.raises(LockError, match="lost its lease"):
            confirm()
    assert lease_of(url)["token"] == taken["token"]  # the new holder's lease is left alone
