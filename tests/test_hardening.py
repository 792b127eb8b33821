"""Hostile manifests, leaked credentials and failures that must stay one clear line.

Every dataset here is real (written by ``run_job``), then tampered with the way an attacker or a careless user
would; the commands run through the real CLI.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import job_overrides, make_image_folder
from safetensors.torch import save_file
from typer.testing import CliRunner

from kmim import storage
from kmim.cli import app
from kmim.config import ConfigError, load_config
from kmim.datasets.loader import LoaderError, TokenDataset
from kmim.datasets.manifest import CODEBOOK, MANIFEST, ManifestError, check_manifest, read_manifest
from kmim.datasets.shards import encode_npy, iter_tar
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import run_job
from kmim.pipeline.publish import PublishError, publish
from kmim.pipeline.runners import map_shards

cli = CliRunner()
SECRET = "kmim-hardening-secret-7f3a"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = make_image_folder(tmp_path_factory.mktemp("images"), per_class=6)
    out = tmp_path_factory.mktemp("ds") / "ds"
    run_job(load_config(None, job_overrides(out=str(out), input=str(images))))
    return out


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


# --- 1. paths read from a manifest ---------------------------------------------------------------------------

HOSTILE = ["../../dev/zero", "/etc/hostname", "file:///dev/zero", "s3://elsewhere/x", "sub/dir", "..",
           ".hidden", "a\\..\\b", "", 7, None]


def set_path(manifest: dict, field: str, value) -> None:
    if field == "codebook.path":
        manifest["codebook"]["path"] = value if not isinstance(value, str) or value in ("", "..") else (
            value + ".safetensors" if not value.endswith("zero") else value)
    elif field == "shards.path":
        manifest["shards"][0]["path"] = value
    else:
        manifest["shards"][0]["index"] = value


@pytest.mark.parametrize("field", ["shards.path", "shards.index", "codebook.path"])
@pytest.mark.parametrize("value", HOSTILE)
def test_every_manifest_path_is_validated_before_use(copy: Path, field: str, value) -> None:
    edit_manifest(copy, partial(set_path, field=field, value=value))
    with pytest.raises(ManifestError, match=rf"field '{field.split('.')[0]}(\[0\])?\.{field.split('.')[1]}'"):
        read_manifest(copy)
    with pytest.raises(LoaderError, match="field"):
        TokenDataset(copy, batch_size=2)


def test_verify_publish_and_eval_refuse_a_traversing_manifest(copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_text(SECRET)
    edit_manifest(copy, lambda m: m["codebook"].update(path=str(secret)))
    started = time.monotonic()
    for args in (["verify", str(copy)], ["eval", "tokenizer", str(copy)],
                 ["publish", str(copy), str(tmp_path / "dest")]):
        res = cli.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        assert "codebook.path" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "dest").exists() or SECRET not in "".join(
        p.read_text(errors="ignore") for p in (tmp_path / "dest").rglob("*") if p.is_file())
    edit_manifest(copy, lambda m: (m["codebook"].update(path=CODEBOOK),
                                   m["shards"][0].update(path="../../dev/zero")))
    res = cli.invoke(app, ["verify", str(copy)])
    assert res.exit_code == 1 and "'../../dev/zero'" in res.output and "shards[0].path" in res.output
    assert time.monotonic() - started < 30  # never hashes /dev/zero


def test_publish_writes_nothing_outside_a_local_destination(copy: Path, tmp_path: Path) -> None:
    edit_manifest(copy, lambda m: m["shards"][0].update(index="../evil.index.parquet"))
    dest = tmp_path / "pub" / "dest"
    with pytest.raises(PublishError, match=r"shards\[0\]\.index"):
        publish(copy, str(dest))
    assert not (tmp_path / "pub").exists()


def test_special_files_in_a_dataset_are_never_read_or_published(dataset: Path, copy: Path, tmp_path: Path) -> None:
    shard = json.loads((copy / MANIFEST).read_text())["shards"][0]
    (copy / shard["path"]).unlink()
    (copy / shard["path"]).symlink_to("/dev/zero")
    assert verify_dataset(copy) == [f"{shard['path']}: not a regular file"]
    (copy / shard["path"]).unlink()
    os.mkfifo(copy / shard["path"])
    assert verify_dataset(copy) == [f"{shard['path']}: not a regular file"]
    (copy / shard["path"]).unlink()
    shutil.copy(dataset / shard["path"], copy / shard["path"])
    index = copy / shard["index"]
    secret = tmp_path / "id_rsa"
    secret.write_text(SECRET)
    index.unlink()
    index.symlink_to(secret)
    with pytest.raises(PublishError, match="not a regular file"):
        publish(copy, str(tmp_path / "dest"))


def test_a_shard_longer_than_the_manifest_says_is_read_one_byte_past_its_size(copy: Path) -> None:
    shard = json.loads((copy / MANIFEST).read_text())["shards"][0]
    with open(copy / shard["path"], "ab") as f:
        f.write(b"\0" * (8 << 20))
    problems = verify_dataset(copy)
    assert f"{shard['path']}: {shard['bytes'] + 1} bytes, manifest says {shard['bytes']}" in problems


# --- 7. malformed files are one line, not a traceback ---------------------------------------------------------

def corrupt_codebook(kind: str, path: Path) -> None:
    good = path.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file at all" * 10)
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, c = f.metadata(), f.get_tensor("centroids")
        tensors = {"float64": {"centroids": c.double()}, "flat": {"centroids": c.flatten()},
                   "missing": {"other": c}, "extra": {"centroids": c, "x": c.clone()}}[kind]
        save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "float64", "flat", "missing", "extra"])
def test_a_malformed_codebook_is_one_fail_line(copy: Path, kind: str) -> None:
    corrupt_codebook(kind, copy / CODEBOOK)
    res = cli.invoke(app, ["verify", str(copy)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    fails = [line for line in res.output.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {CODEBOOK}: "), res.output


@pytest.mark.parametrize("kind", ["garbage", "not-kmim", "bad-stats"])
def test_a_malformed_index_is_one_fail_line(copy: Path, kind: str) -> None:
    import pyarrow.parquet as pq

    entry = json.loads((copy / MANIFEST).read_text())["shards"][0]
    index = copy / entry["index"]
    if kind == "garbage":
        index.write_bytes(b"PAR1 garbage")
    else:
        table = pq.read_table(index)
        meta = {} if kind == "not-kmim" else {b"kmim.shard": b'{"token_counts": {"label": [1], "token": "x"}}'}
        pq.write_table(table.replace_schema_metadata(meta), index)
    for args in (["verify", str(copy)], ["eval", "tokenizer", str(copy)]):
        res = cli.invoke(app, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert entry["index"] in res.output


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "kmim-dataset/1"}',
                                  '{"format": "kmim-dataset/1", "shards": [{"path": "x.tar"}]}'])
def test_a_malformed_manifest_is_one_fail_line(copy: Path, text: str) -> None:
    (copy / MANIFEST).write_text(text)
    for args in (["verify", str(copy)], ["eval", "tokenizer", str(copy)]):
        res = cli.invoke(app, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert MANIFEST in res.output


def rewrite_shard(root: Path, transform) -> None:
    """Rewrite the first shard's samples through ``transform`` and fix its size and sha256 in the manifest, so
    the only thing wrong is what ``transform`` did."""
    manifest = json.loads((root / MANIFEST).read_text())
    entry = manifest["shards"][0]
    with open(root / entry["path"], "rb") as f:
        samples = list(iter_tar(f))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sample in samples:
            for ext, data in transform(dict(sample)).items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    (root / entry["path"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_negative_token_ids_are_refused_by_verify_and_the_loader(copy: Path) -> None:
    def negative(sample: dict) -> dict:
        grid = np.load(io.BytesIO(sample["tokens.npy"])).astype(np.int32)
        grid[0, 0] = -1
        return {**sample, "tokens.npy": encode_npy(grid)}

    rewrite_shard(copy, negative)
    edit_manifest(copy, lambda m: m["token_grid"].update(dtype="int32"))
    problems = verify_dataset(copy)
    assert any("token -1 out of range" in p for p in problems), problems
    ds = TokenDataset(copy, batch_size=2, shuffle=False)
    with pytest.raises(LoaderError, match="token -1 out of range"):
        ds.sample(0)


def test_the_codebook_has_the_same_file_mode_as_every_other_file(dataset: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dataset.iterdir() if not p.name.startswith(".")}
    assert len(set(modes.values())) == 1, modes


def test_paths_with_rich_markup_are_printed_literally(dataset: Path, tmp_path: Path) -> None:
    odd = tmp_path / "data[/red][bold]x"
    shutil.copytree(dataset, odd)
    res = cli.invoke(app, ["verify", str(odd)])
    assert res.exit_code == 0 and f"{odd}: OK" in res.output
    res = cli.invoke(app, ["verify", str(tmp_path / "[/]missing")])
    assert res.exit_code == 1 and "[/]missing" in res.output and "Traceback" not in res.output


def test_full_disk_and_read_only_filesystem_are_not_retried() -> None:
    attempts = []

    def stage(item: int) -> None:
        attempts.append(item)
        raise OSError(item, os.strerror(item))

    codes = [errno.ENOSPC, errno.EROFS, errno.EDQUOT]
    results = list(map_shards(stage, codes, runner="local", desc="t", retries=3))
    assert attempts == codes and all("not retried" in str(error) for _, _, error in results)
    assert storage.is_transient(OSError(errno.ECONNRESET, "reset"))


def test_an_unreachable_object_store_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    res = cli.invoke(app, ["verify", "s3://bucket/prefix"])
    s3fs.S3FileSystem.clear_instance_cache()
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and "Traceback" not in res.output and SECRET not in res.output
    assert len(lines) <= 2 and "Could not connect" in res.output and f"127.0.0.1:{port}" in res.output


# --- 4. credentials never leave the process ------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    f"http://user:{SECRET}@host/data/x.tar",
    f"https://host/x.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}",
    f"https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig={SECRET}",
    f"https://host/x.tar?token={SECRET}#frag", f"gs://b/x?access_token={SECRET}",
])
def test_redact_hides_userinfo_and_signatures(url: str) -> None:
    assert SECRET not in storage.redact(url) and SECRET not in storage.redact_text(f"error at '{url}': 404")
    assert storage.redact(url).split("://")[0] == url.split("://")[0]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_tars(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving WebDataset tars of generated images."""
    root = tmp_path / "www"
    root.mkdir()
    images = make_image_folder(tmp_path / "img", per_class=4)
    for c, folder in enumerate(sorted(images.iterdir())):
        with tarfile.open(root / f"part-{c}.tar", "w") as tar:
            for i, p in enumerate(sorted(folder.iterdir())):
                tar.add(p, f"s{c}_{i}.{p.suffix[1:]}")
                info = tarfile.TarInfo(f"s{c}_{i}.cls")
                info.size = 1
                tar.addfile(info, io.BytesIO(str(c).encode()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_input_credentials_are_never_shown_or_stored(http_tars: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://user:{SECRET}@{http_tars}/part-{{0..2}}.tar?X-Amz-Signature={SECRET}"
    out = tmp_path / "out"
    args = ["run", "--out", str(out), "--input", url, "--runner", "local"]
    for key, value in job_overrides().items():
        if key not in ("runner",):
            args += [f"--{key.replace('_', '-')}", str(value)]
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert SECRET not in res.output and SECRET not in caplog.text
    assert read_manifest(out)["samples"] == 12 and verify_dataset(out) == []
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p.name
    assert json.loads((out / "job.json").read_text())["settings"]["input"].startswith("http://***@")
    res = cli.invoke(app, [*args[:4], f"http://user:{SECRET}@{http_tars}/missing-{{0..1}}.tar"])
    assert res.exit_code == 1 and SECRET not in res.output


def test_a_string_storage_options_in_a_config_file_is_never_echoed(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(f"out: {tmp_path / 'o'}\nstorage_options: 'key={SECRET}'\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert "storage_options" in str(e.value) and SECRET not in str(e.value)
    res = cli.invoke(app, ["run", "--config", str(config)])
    assert res.exit_code == 2 and SECRET not in res.output


def test_check_manifest_accepts_what_kmim_writes(dataset: Path) -> None:
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert check_manifest(manifest, "m") is manifest


def test_a_foreign_codebook_in_the_output_is_refused(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", per_class=6)
    other = tmp_path / "other"
    run_job(load_config(None, job_overrides(out=str(other), input=str(images), k=6)))
    out = tmp_path / "out"
    cfg = load_config(None, job_overrides(out=str(out), input=str(images)))
    run_job(cfg)
    shutil.copy(other / CODEBOOK, out / CODEBOOK)
    (out / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="field 'k' is 6 there, 8 here"):
        run_job(cfg)
