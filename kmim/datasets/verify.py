"""``kmim verify``: re-read every shard of a committed dataset and check it against the manifest.

The dataset is a directory or any fsspec URL; each shard is read once, hashed while its samples are parsed.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fsspec import AbstractFileSystem

from kmim.datasets.codebook import load_codebook_at
from kmim.datasets.manifest import ManifestError, TokenCounts, read_index, read_index_stats, read_manifest
from kmim.datasets.samples import TokenSpec, check_sample
from kmim.datasets.shards import ShardError, iter_tar
from kmim.files import HASH_CHUNK
from kmim.storage import is_local, join, open_url


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes (sha256) and counts the bytes read through it, up to ``limit`` bytes
    (so a shard that is longer than the manifest says, or endless, is read only one byte past its size)."""

    def __init__(self, f: IO[bytes], limit: int):
        self.f, self.sha, self.size, self.limit = f, hashlib.sha256(), 0, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read(min(len(buf), self.limit - self.size))
        buf[:len(data)] = data
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def drain(self) -> tuple[str, int]:
        """Read to the end; return (hex sha256, bytes) of the whole stream."""
        while self.read(HASH_CHUNK):
            pass
        return self.sha.hexdigest(), self.size


def _check_shard(fs: AbstractFileSystem, root: str, entry: dict, manifest: dict, keys: set[str]) -> list[str]:
    name = entry["path"]
    if (problem := _not_a_file(fs, join(root, name))) is not None:
        return [f"{name}: {problem}"]
    with fs.open(join(root, name), "rb") as f:
        stream = _Hashing(f, entry["bytes"] + 1)
        problems, tar_keys, counts, readable = _check_samples(stream, name, manifest, keys)
        digest, size = stream.drain()
    head = []
    if size != entry["bytes"]:
        head.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    if digest != entry["sha256"]:
        head.append(f"{name}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...")
    if not readable:
        return head + problems
    if len(tar_keys) != entry["samples"]:
        problems.append(f"{name}: {len(tar_keys)} samples, manifest says {entry['samples']}")
    return head + problems + _check_index(fs, join(root, entry["index"]), entry, manifest, tar_keys, counts)


def _check_samples(stream: IO[bytes], name: str, manifest: dict,
                   keys: set[str]) -> tuple[list[str], list[str], TokenCounts, bool]:
    """(problems, sample keys, token counts of the samples that passed, whether the tar parsed) of one shard's
    samples; a sample's first problem is reported (:func:`~kmim.datasets.samples.check_sample`)."""
    problems: list[str] = []
    spec = TokenSpec.of(manifest)
    tar_keys: list[str] = []
    counts = TokenCounts(spec.k)
    try:
        for sample in iter_tar(stream, name):
            key = sample["__key__"]
            tar_keys.append(key)
            where = f"{name}: sample {key}"
            if key in keys:
                problems.append(f"{where}: key also appears in another shard")
            keys.add(key)
            try:
                checked = check_sample(sample, spec, where)
            except ShardError as e:
                problems.append(str(e))
                continue
            counts.add_grid(checked.tokens, checked.meta.get("label"))
    except Exception as e:  # noqa: BLE001 - any parse failure of a shard is a verification failure
        return problems + [f"{name}: unreadable: {type(e).__name__}: {e}"], tar_keys, counts, False
    return problems, tar_keys, counts, True


def _check_index(fs: AbstractFileSystem, path: str, entry: dict, manifest: dict, tar_keys: list[str],
                 counts: TokenCounts) -> list[str]:
    """Problems of a shard's index: its 'ok' rows and token counts must match the shard's samples."""
    name, problems = entry["path"], []
    if (problem := _not_a_file(fs, path)) is not None:
        return [f"{entry['index']}: {problem}"]
    try:
        index = read_index(path, fs).to_pydict()
        stats = read_index_stats(path, fs)
    except (OSError, ValueError) as e:
        return [str(e)]
    if stats.get("tokenizer_id") != manifest["tokenizer_id"]:
        problems.append(f"{entry['index']}: tokenizer_id {stats.get('tokenizer_id')!r} is not the manifest's "
                        f"{manifest['tokenizer_id']!r} ({name} was tokenized with another codebook)")
    stored = TokenCounts(counts.k)
    try:
        stored.add_columns(stats["token_counts"], entry["index"])
    except ManifestError as e:
        return problems + [str(e)]
    ok_keys = [k_ for k_, s in zip(index["key"], index["status"], strict=True) if s == "ok"]
    if ok_keys != tar_keys:
        problems.append(f"{entry['index']}: 'ok' rows do not match the samples in {name}")
    if stored != counts:
        problems.append(f"{entry['index']}: token counts do not match the tokens in {name}")
    return problems


def _not_a_file(fs: AbstractFileSystem, path: str) -> str | None:
    """Why ``path`` cannot be read as a dataset file (missing, or on local disk not a regular file: a FIFO or a
    device would block or never end), or None."""
    if not is_local(fs):
        return None if fs.isfile(path) else "missing"
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _check_codebook(fs: AbstractFileSystem, root: str, manifest: dict) -> list[str]:
    name = manifest["codebook"]["path"]
    path = join(root, name)
    if (problem := _not_a_file(fs, path)) is not None:
        return [f"{name}: {problem}"]
    try:
        book = load_codebook_at(fs, path, name)
    except (OSError, ValueError) as e:
        return [str(e)]
    if book.k != manifest["codebook"]["k"]:
        return [f"{name}: K={book.k}, manifest says {manifest['codebook']['k']}"]
    if book.tokenizer_id != manifest["tokenizer_id"]:
        return [f"{name}: tokenizer_id differs from the manifest's"]
    return []


def verify_dataset(root: str | Path, progress: Callable[[str], None] | None = None,
                   storage_options: dict | None = None) -> list[str]:
    """Return a list of problems (empty = the dataset is intact) of the dataset at ``root``, a directory or any
    fsspec URL (``storage_options`` go to its filesystem)."""
    fs, path = open_url(str(root), storage_options)
    try:
        manifest = read_manifest(path, fs)
    except (OSError, ValueError) as e:
        return [str(e)]
    problems = _check_codebook(fs, path, manifest)
    keys: set[str] = set()
    total = 0
    for entry in manifest["shards"]:
        if progress is not None:
            progress(entry["path"])
        problems += _check_shard(fs, path, entry, manifest, keys)
        total += entry["samples"]
    if total != manifest["samples"]:
        problems.append(f"manifest: shards hold {total} samples, 'samples' says {manifest['samples']}")
    return problems
