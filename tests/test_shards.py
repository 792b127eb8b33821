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


def reference_tar(samples: list[dict]) -> bytes:
    """What webdataset's ``TarWriter(encoder=False, mtime=0.0, user="kmim", group="kmim")``, kmim's first shard
    writer, writes: tarfile in stream mode and its default (PAX) format, members in sorted extension order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            for ext in sorted(e for e in sample if not e.startswith("_")):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[ext]), 0.0, 0o444, "kmim", "kmim"
                tar.addfile(info, io.BytesIO(sample[ext]))
    return buf.getvalue()


@pytest.mark.parametrize("count", [0, 1, 7, 40])
def test_writer_bytes_match_tarfile(tmp_path: Path, count: int) -> None:
    rng = np.random.default_rng(count)
    sizes = [0, 1, 511, 512, 513, 10_240, *rng.integers(0, 5000, 40).tolist()]
    samples = [{"__key__": f"{i:016x}", "png": rng.bytes(sizes[i % len(sizes)]), "__url__": "metadata, not stored",
                "tokens.npy": encode_npy(rng.integers(0, 1024, (8, 8)).astype(np.uint16)),
                "json": bytearray(b'{"key": "%016x"}' % i)} for i in range(count)]
    sha256, size = write(tmp_path / "a.tar", samples)
    expected = reference_tar(samples)
    assert (tmp_path / "a.tar").read_bytes() == expected
    assert (sha256, size) == sha256_file(tmp_path / "a.tar") and size % tarfile.RECORDSIZE == 0


@pytest.mark.parametrize("sample", [{"__key__": "../evil", "png": b"x"}, {"__key__": "a.b", "png": b"x"},
                                    {"__key__": "k", "a/png": b"x"}, {"__key__": "k" * 97, "png": b"x"},
                                    {"__key__": "k", "png": "text"}, {"__key__": "k\n", "png": b"x"}])
def test_writer_refuses_members_the_reader_would_not_accept(tmp_path: Path, sample: dict) -> None:
    w = ShardWriter(tmp_path / "a.tar")
    w.write({"__key__": "good", "png": b"x"})
    with pytest.raises(ValueError, match="shard member"):
        w.write({**sample, "json": b"{}"})
    w.finish()
    w.commit()
    assert (tmp_path / "a.tar").read_bytes() == reference_tar([{"__key__": "good", "png": b"x"}])
    with pytest.raises(ValueError, match="finished"):
        w.write({"__key__": "late", "png": b"x"})


def test_encode_npy_is_np_save() -> None:
    arrays = [np.arange(64, dtype=np.uint16).reshape(8, 8), np.arange(24, dtype=">i4").reshape(2, 3, 4),
              np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.arange(10)[::2],
              np.arange(24).reshape(2, 3, 4)[:, 1], np.array(3), np.zeros((0, 3), np.uint16),
              np.zeros(2, [("a", "<u2"), ("b", "<f4")])]
    for arr in arrays:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        assert encode_npy(arr) == buf.getvalue()
    with pytest.raises(ValueError):  # never pickled
        encode_npy(np.array([{"a": 1}], dtype=object))


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


@pytest.mark.parametrize("name", ["../evil.png", "/etc/passwd.png", "dir/x.png", "noext", ".hidden.png", "a..b",
                                  "k.png\n"])
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


def test_webdataset_reads_kmim_shards(tmp_path: Path) -> None:
    import webdataset as wds

    samples = [{"__key__": f"{i:016x}", "png": bytes([i]) * (i + 1), "json": b'{"label": %d}' % i,
                "tokens.npy": encode_npy(np.full((2, 2), i, np.uint16))} for i in range(5)]
    write(tmp_path / "shard-00000.tar", samples)
    got = list(wds.WebDataset(str(tmp_path / "shard-00000.tar"), shardshuffle=False))
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    assert all(g["png"] == s["png"] and g["json"] == s["json"] and np.array_equal(decode_npy(g["tokens.npy"]),
                                                                                     decode_npy(s["tokens.npy"]))
               for g, s in zip(got, samples, strict=True))
