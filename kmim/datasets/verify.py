"""``kmim verify``: re-read every shard of a committed dataset and check it against the manifest.

The dataset is a directory or any fsspec URL; each shard is read once, hashed while its samples are parsed.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from fsspec import AbstractFileSystem

from kmim.datasets.manifest import CODEBOOK, read_index, read_index_stats, read_manifest
from kmim.datasets.preprocess import IMAGE_EXTS
from kmim.datasets.shards import HASH_CHUNK, decode_npy, iter_tar, sample_meta
from kmim.storage import get_file, is_local, join, open_url
from kmim.tokenizers.codebook import load_codebook


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes (sha256) and counts the bytes read through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read(len(buf))
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
    try:
        f = fs.open(join(root, name), "rb")
    except (FileNotFoundError, IsADirectoryError):
        return [f"{name}: missing"]
    with f:
        stream = _Hashing(f)
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
                   keys: set[str]) -> tuple[list[str], list[str], dict[int, np.ndarray], bool]:
    """(problems, sample keys, token counts per label, whether the tar parsed) of one shard's samples."""
    problems: list[str] = []
    k = manifest["codebook"]["k"]
    shape = tuple(manifest["token_grid"]["shape"])
    dtype = np.dtype(manifest["token_grid"]["dtype"])
    tar_keys: list[str] = []
    counts: dict[int, np.ndarray] = {}
    try:
        for sample in iter_tar(stream, name):
            key = sample["__key__"]
            tar_keys.append(key)
            where = f"{name}: sample {key}"
            if key in keys:
                problems.append(f"{where}: key also appears in another shard")
            keys.add(key)
            images = [e for e in IMAGE_EXTS if e in sample]
            if len(images) != 1:
                problems.append(f"{where}: expected one image member, found {images or 'none'}")
            meta = sample_meta(sample, name)
            if meta.get("key") != key:
                problems.append(f"{where}: .json key does not match the member name")
            if "tokens.npy" not in sample:
                problems.append(f"{where}: no .tokens.npy")
                continue
            tokens = decode_npy(sample["tokens.npy"])
            if tokens.dtype != dtype or tokens.shape != shape:
                problems.append(f"{where}: tokens {tokens.dtype}{list(tokens.shape)}, "
                                f"manifest says {dtype}{list(shape)}")
            elif tokens.size and (int(tokens.max()) >= k or int(tokens.min()) < 0):
                problems.append(f"{where}: token {int(tokens.max())} out of range for K={k}")
            else:
                label = -1 if meta.get("label") is None else meta["label"]
                counts[label] = counts.get(label, 0) + np.bincount(tokens.ravel(), minlength=k)
    except Exception as e:  # noqa: BLE001 - any parse failure of a shard is a verification failure
        return problems + [f"{name}: unreadable: {type(e).__name__}: {e}"], tar_keys, counts, False
    return problems, tar_keys, counts, True


def _check_index(fs: AbstractFileSystem, path: str, entry: dict, manifest: dict, tar_keys: list[str],
                 counts: dict[int, np.ndarray]) -> list[str]:
    """Problems of a shard's index: its 'ok' rows and token counts must match the shard's samples."""
    name, k, problems = entry["path"], manifest["codebook"]["k"], []
    try:
        index = read_index(path, fs).to_pydict()
        tc = read_index_stats(path, fs)["token_counts"]
    except FileNotFoundError:
        return [f"{entry['index']}: missing"]
    ok_keys = [k_ for k_, s in zip(index["key"], index["status"], strict=True) if s == "ok"]
    if ok_keys != tar_keys:
        problems.append(f"{entry['index']}: 'ok' rows do not match the samples in {name}")
    stored: dict[int, np.ndarray] = {}
    for label, token, count in zip(tc["label"], tc["token"], tc["count"], strict=True):
        stored.setdefault(label, np.zeros(k, np.int64))[token] += count
    if sorted(stored) != sorted(counts) or any(not np.array_equal(stored[lab], counts[lab]) for lab in counts):
        problems.append(f"{entry['index']}: token counts do not match the tokens in {name}")
    return problems


def _check_codebook(fs: AbstractFileSystem, root: str, manifest: dict) -> list[str]:
    name = manifest["codebook"]["path"] if "codebook" in manifest else CODEBOOK
    path = join(root, name)
    if not fs.isfile(path):
        return [f"{name}: missing"]
    try:
        if is_local(fs):
            book = load_codebook(path)
        else:
            with tempfile.TemporaryDirectory(prefix="kmim-verify-") as d:
                get_file(fs, path, Path(d) / CODEBOOK)
                book = load_codebook(Path(d) / CODEBOOK)
    except (OSError, ValueError) as e:
        return [f"{name}: {e}"]
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
