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
