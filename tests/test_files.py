"""kmim.files: atomic writes leave either the complete file or nothing, and hash what they write."""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import numpy as np
import pytest

from kmim import files
from kmim.datasets.manifest import ManifestError, TokenCounts
from kmim.datasets.shards import ShardWriter
from kmim.files import TMP_GLOB, AtomicFile, atomic_write, atomic_write_bytes, sha256_file
from kmim.pipeline.stages import _count_tokens


def test_tmp_path_is_a_hidden_sibling(tmp_path: Path) -> None:
    tmp = files.tmp_path(tmp_path / "a.tar")
    assert tmp.parent == tmp_path and tmp.name.startswith(".a.tar.") and fnmatch.fnmatch(tmp.name, TMP_GLOB)


def _half_then_fail(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise RuntimeError("the writer failed")


def test_atomic_write_replaces_or_leaves_untouched(tmp_path: Path) -> None:
    final = tmp_path / "x.bin"
    atomic_write_bytes(final, b"one")
    with pytest.raises(RuntimeError):
        atomic_write(final, _half_then_fail)
    assert final.read_bytes() == b"one" and list(tmp_path.iterdir()) == [final]


def test_atomic_file_hashes_while_writing(tmp_path: Path) -> None:
    final = tmp_path / "f.npy"
    with AtomicFile(final) as f:
        np.save(f, np.arange(1000), allow_pickle=False)
        assert not final.exists()
    assert (f.sha256, f.size) == sha256_file(final) == (hashlib.sha256(final.read_bytes()).hexdigest(),
                                                         final.stat().st_size)
    with pytest.raises(ValueError), AtomicFile(tmp_path / "g.bin") as g:
        g.write(b"partial")
        raise ValueError("the block failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]


def test_atomic_file_buffers_small_writes_across_its_buffer(tmp_path: Path) -> None:
    chunks = [bytes([i % 251]) * (i % 700) for i in range(5000)]  # 1.7 MB in small writes, over WRITE_BUFFER
    with AtomicFile(tmp_path / "x.bin") as f:
        for chunk in chunks:
            f.write(chunk)
    data = b"".join(chunks)
    assert len(data) > files.WRITE_BUFFER and (tmp_path / "x.bin").read_bytes() == data
    assert (f.sha256, f.size) == (hashlib.sha256(data).hexdigest(), len(data))


def test_shard_writer_context(tmp_path: Path) -> None:
    sample = {"__key__": "k0", "png": b"x", "json": b"{}"}
    with ShardWriter(tmp_path / "a.tar") as shard:
        shard.write(sample)
        digest = shard.finish()
        assert not (tmp_path / "a.tar").exists()  # invisible until committed
    assert digest == sha256_file(tmp_path / "a.tar")
    with pytest.raises(KeyError), ShardWriter(tmp_path / "b.tar") as shard:
        shard.write(sample)
        raise KeyError("the block failed")
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


def test_token_counts_round_trip() -> None:
    counts = TokenCounts(4)
    counts.add_grid(np.array([[0, 3], [3, 3]], np.uint16), None)
    counts.add_grid(np.array([[1, 1], [2, 0]], np.uint16), 7)
    columns = counts.columns()
    assert columns == {"label": [-1, -1, 7, 7, 7], "token": [0, 3, 0, 1, 2], "count": [1, 3, 1, 2, 1]}
    again = TokenCounts(4)
    again.add_columns(columns, "index")
    assert again == counts
    with pytest.raises(ManifestError, match=r"index: field 'token_counts': a token id is out of range \[0, 3\)"):
        TokenCounts(3).add_columns(columns, "index")


def test_token_counts_by_batch_match_grid_by_grid() -> None:
    rng = np.random.default_rng(0)
    grids = rng.integers(0, 16, (40, 2, 3, 3)).astype(np.uint16)
    labels = [[None, 3, -1, 0, 7][i % 5] for i in range(40)]
    one_by_one, batched = TokenCounts(16), TokenCounts(16)
    for grid, label in zip(grids, labels, strict=True):
        one_by_one.add_grid(grid, label)
    _count_tokens(batched, grids, labels)
    assert batched == one_by_one and batched.columns() == one_by_one.columns()
    assert TokenCounts(16).columns() == {"label": [], "token": [], "count": []}
