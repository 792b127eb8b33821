"""Shard tar I/O: atomic writes, reproducible bytes, and a reader that rejects unsafe member names."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kmim.datasets.shards import ShardError, ShardWriter, decode_npy, encode_npy, iter_tar
from kmim.files import sha256_file


def write(path: Path, samples: list[dict]) -> tuple[str, int]:
    w = ShardWriter(path)
    for s in samples:
        w.write(s)
    digest = w.finish()
    w.commit()
    return digest


def test_writer_is_atomic_and_reproducible(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "png": b"x" * i, "json": b"{}"} for i in range(3)]
    w = ShardWriter(tmp_path / "a.tar")
    w.write(samples[0])
    assert not (tmp_path / "a.tar").exists()  # invisible until committed
    w.abort()
    assert list(tmp_path.iterdir()) == []
    d1 = write(tmp_path / "a.tar", samples)
    d2 = write(tmp_path / "b.tar", samples)
    assert d1 == d2 == sha256_file(tmp_path / "a.tar")
    with open(tmp_path / "a.tar", "rb") as f:
        got = list(iter_tar(f))
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2"] and got[2]["png"] == b"xx"


def raw_tar(members: list[tarfile.TarInfo], data: bytes = b"abc") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", ["../evil.png", "/etc/passwd.png", "dir/x.png", "noext", ".hidden.png", "a..b"])
def test_reader_rejects_unsafe_names(name: str) -> None:
    with pytest.raises(ShardError):
        list(iter_tar(raw_tar([tarfile.TarInfo(name)])))


def test_reader_rejects_links_dirs_and_duplicates() -> None:
    link = tarfile.TarInfo("a.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ShardError, match="not a regular file"):
        list(iter_tar(raw_tar([link])))
    with pytest.raises(ShardError, match="appears twice"):
        list(iter_tar(raw_tar([tarfile.TarInfo("a.png"), tarfile.TarInfo("b.png"), tarfile.TarInfo("a.json")])))


def test_npy_fast_path_matches_np_load_and_falls_back() -> None:
    grid = np.arange(64, dtype=np.uint16).reshape(8, 8)
    data = encode_npy(grid)
    fast = decode_npy(data, (grid.dtype.str, (8, 8)))
    assert fast.dtype == grid.dtype and np.array_equal(fast, grid) and fast.flags.writeable
    # Another dtype, shape or a Fortran-order header than expected: np.load reads what is really there.
    for other in (grid.astype(np.int32), grid.reshape(4, 16), np.asfortranarray(grid.reshape(4, 16))):
        got = decode_npy(encode_npy(other), (grid.dtype.str, (8, 8)))
        assert got.dtype == other.dtype and got.shape == other.shape and np.array_equal(got, other)
    with pytest.raises(ValueError):  # a pickled object array is refused, never unpickled
        decode_npy(_pickled_npy(), (grid.dtype.str, (8, 8)))


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()
