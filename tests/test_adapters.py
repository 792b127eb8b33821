"""Canaries for the fsspec private API kmim relies on, each behind one adapter in kmim.storage.

If one of these fails after an fsspec upgrade, the private API changed: fix the named adapter (the only caller).
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from kmim.storage import fs_parent, fs_path, join


def _changed(adapter: str, private: str, detail: str) -> str:
    return (f"fsspec {fsspec.__version__} changed its private {private}: {detail}. Update the adapter "
            f"kmim.storage.{adapter}, the one place kmim calls it.")


def _s3() -> AbstractFileSystem:
    s3fs = pytest.importorskip("s3fs")
    return s3fs.S3FileSystem(anon=True, skip_instance_cache=True)  # connects lazily: nothing is contacted here


@pytest.mark.parametrize(("make_fs", "path", "parent"), [
    (LocalFileSystem, "/data/out/shard-00000.tar", "/data/out"),
    (MemoryFileSystem, "/data/out/shard-00000.tar", "/data/out"),
    (_s3, "bucket/out/shard-00000.tar", "bucket/out"),
])
def test_fs_parent(make_fs, path: str, parent: str) -> None:
    fs = make_fs()
    assert callable(getattr(fs, "_parent", None)), _changed("fs_parent", "fs._parent", "it is gone")
    got = fs_parent(fs, path)
    assert got == parent, _changed("fs_parent", "fs._parent", f"{path!r} gives {got!r}, not {parent!r}")


@pytest.mark.parametrize(("make_fs", "url", "path"), [
    (LocalFileSystem, "file:///data/out/a.index.parquet", "/data/out/a.index.parquet"),
    (MemoryFileSystem, "memory://data/out/a.index.parquet", "/data/out/a.index.parquet"),
    (_s3, "s3://bucket/out/a.index.parquet", "bucket/out/a.index.parquet"),
])
def test_fs_path_strips_the_protocol(make_fs, url: str, path: str) -> None:
    fs = make_fs()
    assert callable(getattr(fs, "_strip_protocol", None)), _changed("fs_path", "fs._strip_protocol", "it is gone")
    for given in (url, path):
        got = fs_path(fs, given)
        assert got == path, _changed("fs_path", "fs._strip_protocol", f"{given!r} gives {got!r}, not {path!r}")


@pytest.mark.parametrize("remote", [False, True])
def test_fs_path_names_the_keys_of_cat(tmp_path: Path, remote: bool) -> None:
    """kmim.datasets.manifest.index_stats finds each file's bytes (or error) in ``fs.cat``'s result by fs_path."""
    fs: AbstractFileSystem = MemoryFileSystem() if remote else LocalFileSystem()
    root = "/kmim-canary" if remote else str(tmp_path)
    fs.pipe(join(root, "a.index.parquet"), b"abc")
    paths = [join(root, "a.index.parquet"), join(root, "missing.index.parquet")]
    try:
        blobs = fs.cat(paths, on_error="return")
    finally:
        if remote:
            fs.rm(root, recursive=True)
    keys = {fs_path(fs, p) for p in paths}
    assert set(blobs) == keys, _changed("fs_path", "fs._strip_protocol",
                                        f"fs.cat's keys {sorted(blobs)} are not {sorted(keys)}")
    assert blobs[fs_path(fs, paths[0])] == b"abc"
    assert isinstance(blobs[fs_path(fs, paths[1])], FileNotFoundError)
