"""kmim serve: exact byte ranges, sha256 ETags, 304, nothing reachable but the listed files, GET/HEAD only, the bearer
token, an object-store dataset, the report at /, and a two-process gloo DDP run streaming from the server.

Servers run on 127.0.0.1, on a free port: in a thread of the test process, or as a ``kmim serve`` subprocess.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import job_overrides, make_image_folder, moto_s3
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import load_config
from kmim.datasets.loader import TokenDataset, TokenLoader
from kmim.datasets.shard_store import LoaderError
from kmim.pipeline.job import run_job
from kmim.serve import files
from kmim.serve.files import FileTable, ServeError, data_files, report_files
from kmim.serve.ranges import Unsatisfiable, byte_range
from kmim.serve.server import is_loopback, make_server, report_table, serve

BIN = Path(sys.executable).parent
TOKEN = "kmim-serve-" + uuid.uuid4().hex  # must never show up in a log
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {"model_dim": 64, "model_depth": 2, "model_heads": 2}
TYPES = {".tar": "application/x-tar", ".json": "application/json", ".parquet": "application/vnd.apache.parquet",
         ".safetensors": "application/octet-stream"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed 36-image dataset in 4 shards (32 px, patch 8, K=8)."""
    root = tmp_path_factory.mktemp("serve")
    run_job(load_config(None, job_overrides(out=str(root / "ds"), input=str(make_image_folder(root / "images")))))
    return root / "ds"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report whose page names two PNGs it holds, and others that must not be served: outside it, under data/,
    a symlink, a missing one; beside them an unnamed PNG and a text file."""
    root = tmp_path_factory.mktemp("report")
    (root / "outside.png").write_bytes(PNG)
    report = root / "report"
    (report / "img").mkdir(parents=True)
    (report / "data").mkdir()
    for name in ("a.png", "img/b.png", "c.png", "data/x.png"):
        (report / name).write_bytes(PNG + name.encode())
    (report / "link.png").symlink_to(root / "outside.png")
    (report / "notes.txt").write_text("not part of the report")
    (report / "index.html").write_text(
        '<!doctype html><html><body><img src="a.png"><img src="./img/b.png"><img src="../outside.png">'
        '<img src="data/x.png"><img src="link.png"><img src="missing.png"></body></html>\n')
    return report


@contextmanager
def serving(data: FileTable, report: FileTable, token: str | None = None) -> Iterator[str]:
    """The application on a free 127.0.0.1 port in a thread, as its base URL; stopped on exit."""
    server = make_server(data, report, token, "127.0.0.1", 0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def served(dataset: Path, report_dir: Path) -> Iterator[str]:
    with serving(data_files(str(dataset)), report_files(report_dir)) as base:
        yield base


def fetch(base: str, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of one request, ``path`` sent exactly as given."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def listed(dataset: Path) -> list[str]:
    """Every file the manifest lists, and the manifest."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    return ["manifest.json", manifest["codebook"]["path"],
            *itertools.chain.from_iterable((e["path"], e["index"]) for e in manifest["shards"])]


@pytest.mark.parametrize(("header", "span"), [
    (None, None), ("bytes=0-0", (0, 1)), ("bytes=0-99", (0, 100)), ("bytes=10-", (10, 100)), ("bytes=-1", (99, 100)),
    ("bytes=-100", (0, 100)), ("bytes=-1000", (0, 100)), ("bytes=90-1000", (90, 100)), ("bytes=99-99", (99, 100)),
    ("Bytes=5-6", (5, 7)), ("bytes=5-2", None), ("bytes=-", None), ("items=0-1", None), ("bytes=0-1,4-5", None),
    ("bytes=a-b", None), ("bytes=1-2-3", None), ("bytes=+1-2", None),
])
def test_byte_range(header: str | None, span: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == span


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100),
                                              ("bytes=-5", 0), ("bytes=0-", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        byte_range(header, size)


def test_ranges_return_the_exact_bytes(served: str, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "CHUNK", 4096)  # bodies cross chunk boundaries
    for name in listed(dataset):
        data = (dataset / name).read_bytes()
        n = len(data)
        status, headers, body = fetch(served, f"/data/{name}")
        assert (status, body, headers["content-length"], headers["accept-ranges"]) == (200, data, str(n), "bytes")
        spans = {"0-0": (0, 1), "0-": (0, n), f"{n - 1}-": (n - 1, n), "-1": (n - 1, n), f"-{n + 50}": (0, n),
                 f"1000-{n + 10}": (1000, n), "4095-4096": (4095, 4097), "-5000": (max(0, n - 5000), n),
                 f"{n // 3}-{2 * n // 3}": (n // 3, 2 * n // 3 + 1)}
        for spec, (start, stop) in spans.items():
            if stop > n:  # 4095-4096 in a file shorter than 4097 bytes
                continue
            status, headers, body = fetch(served, f"/data/{name}", headers={"Range": f"bytes={spec}"})
            assert status == 206 and body == data[start:stop], (name, spec)
            assert headers["content-range"] == f"bytes {start}-{stop - 1}/{n}"
            assert headers["content-length"] == str(stop - start)
        for spec in (f"{n}-", f"{n + 5}-{n + 9}", "-0"):
            status, headers, body = fetch(served, f"/data/{name}", headers={"Range": f"bytes={spec}"})
            assert (status, headers["content-range"], body) == (416, f"bytes */{n}", b""), (name, spec)
        for spec in ("bytes=5-2", "bytes=0-1,4-5", "lines=1-2"):  # ignored: the whole file
            assert fetch(served, f"/data/{name}", headers={"Range": spec})[::2] == (200, data)
        status, headers, body = fetch(served, f"/data/{name}", "HEAD", {"Range": "bytes=0-9"})  # GET only
        assert (status, headers["content-length"], body) == (200, str(n), b"")


def test_etags_content_types_and_304(served: str, dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    for entry in manifest["shards"]:
        assert fetch(served, f"/data/{entry['path']}", "HEAD")[1]["etag"] == f'"{entry["sha256"]}"'
    for name in listed(dataset):
        status, headers, _ = fetch(served, f"/data/{name}", "HEAD")
        etag = f'"{hashlib.sha256((dataset / name).read_bytes()).hexdigest()}"'
        assert (status, headers["etag"], headers["content-type"]) == (200, etag, TYPES[Path(name).suffix])
        for match in (etag, f"W/{etag}", "*", f'"other", {etag}'):
            status, headers, body = fetch(served, f"/data/{name}", headers={"If-None-Match": match})
            assert (status, headers["etag"], body) == (304, etag, b""), (name, match)
        assert fetch(served, f"/data/{name}", headers={"If-None-Match": '"other"'})[0] == 200
        assert fetch(served, f"/data/{name}", headers={"Range": "bytes=0-3", "If-Range": etag})[0] == 206
        assert fetch(served, f"/data/{name}", headers={"Range": "bytes=0-3", "If-Range": '"stale"'})[0] == 200


def test_the_report_is_served_at_the_root(served: str, report_dir: Path) -> None:
    page = (report_dir / "index.html").read_bytes()
    for path in ("/", "/index.html"):
        status, headers, body = fetch(served, path)
        assert (status, headers["content-type"], body) == (200, "text/html; charset=utf-8", page)
        assert "default-src 'none'" in headers["content-security-policy"]
    for name in ("a.png", "img/b.png"):
        status, headers, body = fetch(served, f"/{name}")
        assert (status, headers["content-type"], body) == (200, "image/png", (report_dir / name).read_bytes())
        assert headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    for path in ("/c.png", "/link.png", "/missing.png", "/notes.txt", "/../outside.png", "/%2e%2e/outside.png",
                 "/data/x.png", "/img", "/img/", "/./a.png", "/a.png/", "/index.html/"):
        assert fetch(served, path)[0] == 404, path


def test_nothing_else_is_reachable(dataset: Path, report_dir: Path, tmp_path: Path) -> None:
    ds = Path(shutil.copytree(dataset, tmp_path / "ds"))
    (ds / "evil.tar").symlink_to("/etc/passwd")
    (ds / "shard-link.tar").symlink_to(ds / "shard-00000.tar")
    (ds / "extra.tar").write_bytes((ds / "shard-00000.tar").read_bytes())
    (ds / "sub").mkdir()
    (ds / "sub" / "manifest.json").write_bytes((ds / "manifest.json").read_bytes())
    shard, absolute = "shard-00000.tar", str(ds / "job.json")
    paths = [
        "/data/", "/data", "/data/job.json", "/data/extra.tar", "/data/evil.tar", "/data/shard-link.tar", "/data/sub",
        "/data/sub/", "/data/sub/manifest.json", "/data/../job.json", "/data/../data/manifest.json",
        "/data/%2e%2e/job.json", "/data/%2E%2E%2Fjob.json", "/data/..%2fjob.json", "/data/%252e%252e%252fjob.json",
        "/data/..%252fjob.json", "/data/..\\job.json", "/data/..%5cjob.json", "/data/.\\manifest.json",
        "/data//etc/passwd", "/data/" + absolute, "/data/%2F" + absolute.lstrip("/"), "/data/file://" + absolute,
        "//etc/passwd", "/etc/passwd", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
        f"/data/{shard}/", f"/data/{shard}.bak", f"/data/{shard}%00", f"/data/{shard}%3Fx", f"/data/{shard}%23x",
        f"/data/{shard}%20", f"/data/{shard};x", f"/data/./{shard}", f"/data/{shard}/..", f"/data/{shard.upper()}",
        f"/data/%2e/{shard}", f"/data/sub/../{shard}", f"/data//{shard}", f"/{shard}", "/manifest.json",
        "/data/manifest.json.tmp", "/data/.manifest.json",
    ]
    with serving(data_files(str(ds)), report_files(report_dir)) as base:
        for path in paths:
            for method in ("GET", "HEAD"):
                assert fetch(base, path, method)[0] == 404, (method, path)
        assert fetch(base, f"/data/{shard}?x=1")[0] == 200  # a query is not part of the path
        # Listed files that stopped being regular files of their size after start: 404 too.
        (ds / shard).unlink()
        (ds / shard).symlink_to(ds / "extra.tar")
        index = "shard-00001.index.parquet"
        (ds / index).write_bytes((ds / index).read_bytes()[:-1])
        for name in (shard, index):
            assert fetch(base, f"/data/{name}")[0] == 404, name
        assert fetch(base, "/data/shard-00002.tar")[0] == 200


def test_a_broken_dataset_is_refused_at_start(dataset: Path, tmp_path: Path) -> None:
    ds = Path(shutil.copytree(dataset, tmp_path / "ds"))
    (ds / "shard-00001.tar").write_bytes((ds / "shard-00001.tar").read_bytes()[:-512])
    with pytest.raises(ServeError, match="shard-00001.tar.*the manifest lists"):
        data_files(str(ds))
    (ds / "shard-00001.tar").unlink()
    (ds / "shard-00001.tar").symlink_to(dataset / "shard-00001.tar")
    with pytest.raises(ServeError, match="not a regular file"):
        data_files(str(ds))
    (ds / "shard-00002.index.parquet").unlink()
    with pytest.raises(ServeError, match="shard-0000[12]"):
        data_files(str(ds))
    with pytest.raises(ServeError, match="no manifest"):
        data_files(str(tmp_path))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
def test_only_get_and_head(served: str, method: str) -> None:
    for path in ("/", "/data/manifest.json", "/data/nothing"):
        status, headers, _ = fetch(served, path, method)
        assert (status, headers["allow"]) == (405, "GET, HEAD"), path


def test_bearer_token(dataset: Path, report_dir: Path, tmp_path: Path) -> None:
    with serving(data_files(str(dataset)), report_files(report_dir), TOKEN) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}, {"X-Token": TOKEN}):
            for path in ("/", "/data/manifest.json", "/data/nothing"):
                status, got, _ = fetch(base, path, headers=headers)
                assert (status, got.get("www-authenticate")) == (401, 'Bearer realm="kmim"'), (headers, path)
        assert fetch(base, "/data/manifest.json", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
        assert fetch(base, "/data/nothing", headers=AUTH)[0] == 404
        url = f"{base}/data/"
        with pytest.raises(LoaderError, match="no manifest.*server refused the request.*Bearer"):
            TokenDataset(url, batch_size=4)
        ds = TokenDataset(url, batch_size=4, cache_dir=tmp_path / "cache",
                          storage_options={"client_kwargs": {"headers": AUTH}})
        ds.read_shard("shard-00001.tar")  # the parent's filesystem, which forked workers must not reuse
        batches = list(TokenLoader(ds, num_workers=2))
    assert len(batches) == 9 and all(b["tokens"].shape == (4, 4, 4) for b in batches)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert {p.stem for p in (tmp_path / "cache").iterdir()} == {e["sha256"] for e in manifest["shards"]}


def test_an_object_store_dataset_is_served(dataset: Path, report_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    import s3fs

    monkeypatch.setattr(files, "CHUNK", 10_000)  # several ranged reads of the object store per response
    with moto_s3("kmim-serve-secret"):
        bucket = f"kmim-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().put([str(dataset / name) for name in listed(dataset)], f"{bucket}/ds/")
        with serving(data_files(f"s3://{bucket}/ds"), report_files(report_dir)) as base:
            for name in listed(dataset):
                data = (dataset / name).read_bytes()
                status, headers, body = fetch(base, f"/data/{name}")
                assert (status, body) == (200, data)
                assert headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
                start = min(9999, len(data) // 2)
                status, _, body = fetch(base, f"/data/{name}", headers={"Range": f"bytes={start}-{start + 10001}"})
                assert (status, body) == (206, data[start:start + 10002])
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_served_dataset_can_be_served_again(served: str, dataset: Path, report_dir: Path) -> None:
    """A dataset whose root is an http:// URL (here another kmim serve, which cannot list a directory)."""
    with serving(data_files(served + "/data/"), report_files(report_dir)) as again:
        for name in listed(dataset):
            status, headers, body = fetch(again, f"/data/{name}")
            assert status == 200 and body == (dataset / name).read_bytes()
            assert headers["etag"] == fetch(served, f"/data/{name}", "HEAD")[1]["etag"]


def test_ddp_training_streams_from_the_server(dataset: Path, report_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks train from http://127.0.0.1:PORT/data/, the token passed to fsspec's HTTP filesystem through
    its environment configuration; every shard is fetched, checked against its sha256 and cached."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    with serving(data_files(str(dataset)), report_files(report_dir), TOKEN) as base:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache),
               "FSSPEC_HTTP": json.dumps({"client_kwargs": {"headers": AUTH}})}
        cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(master_port), "--no-python", str(BIN / "kmim"), "train", "--data",
               f"{base}/data/", "--out", str(run), "--objective", "beit", "--batch-size", "4", "--max-steps", "4",
               "--log-every", "2", "--sample-log", "--device", "cpu",
               *itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in TINY.items())]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [[json.loads(line) for line in (run / f"samples.rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    ids = [{i for row in log for i in row["index"]} for log in seen]
    assert len(ids[0]) == len(ids[1]) == 16 and not ids[0] & ids[1]
    manifest = json.loads((dataset / "manifest.json").read_text())
    cached = {p.stem for p in (cache / "kmim" / "shards").iterdir()}
    assert cached and cached <= {e["sha256"] for e in manifest["shards"]}
    assert TOKEN not in proc.stdout + proc.stderr


def test_cli_serves_until_interrupted_and_never_logs_the_token(dataset: Path, report_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "kmim"), "serve", str(dataset), "--port", str(port), "--report",
                             str(report_dir)], env={**os.environ, "KMIM_SERVE_TOKEN": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "kmim serve did not start"
            try:
                status, _, page = fetch(base, "/", headers=AUTH)
                break
            except OSError:
                time.sleep(0.1)
        assert (status, page) == (200, (report_dir / "index.html").read_bytes())
        assert fetch(base, "/a.png", headers=AUTH)[0] == 200
        assert fetch(base, "/data/shard-00000.tar", headers={**AUTH, "Range": "bytes=0-9"})[0] == 206
        assert fetch(base, "/data/manifest.json")[0] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    # A clean stop: uvicorn re-raises the signal after shutting down, or exits 0 when it arrives during startup.
    assert proc.returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), output
    assert "Application shutdown complete" in output
    assert '"GET /data/shard-00000.tar HTTP/1.1" 206' in output and TOKEN not in output


def test_binding_beyond_loopback_needs_the_flag(dataset: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    res = cli.invoke(app, ["serve", str(dataset), "--host", "0.0.0.0", "--report", str(tmp_path)])
    assert res.exit_code == 1 and "--allow-remote" in res.output, res.output
    # With the flag: the warning, then (no manifest here) an error before anything listens.
    res = cli.invoke(app, ["serve", str(tmp_path), "--host", "0.0.0.0", "--allow-remote"])
    assert res.exit_code == 1 and "warning" in res.output and "no manifest" in res.output, res.output
    with pytest.raises(ServeError, match="token is empty"):
        serve(str(dataset), token=" ")
    assert all(map(is_loopback, ("127.0.0.1", "127.3.2.1", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.10", "example.com", "localhost.example.com")))


def test_the_report_is_built_at_start(dataset: Path) -> None:
    pytest.importorskip("kmim.report", reason="kmim report is not there yet")
    with report_table(str(dataset), None, None) as pages:
        page = pages.get("index.html")
        assert page is not None and Path(page.location).stat().st_size == page.size
        assert all(f.content_type == "image/png" for name, f in pages.files.items() if name != "index.html")
