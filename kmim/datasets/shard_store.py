"""Manifest-listed shards as bytes for the training loader: local ones read in place, remote ones through
an LRU disk cache keyed by sha256; every read is checked against the manifest (size, and sha256 unless
verification is off)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import fsspec

from kmim.files import atomic_write_bytes
from kmim.storage import is_local, join


class LoaderError(ValueError):
    """A dataset or shard the loader refuses: not in the manifest, wrong tokenizer, checksum or content mismatch."""


class ShardStore:
    """Reads manifest-listed shards as bytes: local ones in place, remote ones through an LRU disk cache."""

    def __init__(self, root: str, entries: dict[str, dict], storage_options: dict, verify: bool,
                 cache_dir: Path, cache_bytes: int):
        self.root, self.entries, self.storage_options = root, entries, storage_options
        self.verify, self.cache_dir, self.cache_bytes = verify, cache_dir, cache_bytes
        self._fs: fsspec.AbstractFileSystem | None = None
        self._path = ""
        self._pid = 0  # the process that opened _fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}  # filesystems are reopened per worker process

    def _filesystem(self) -> fsspec.AbstractFileSystem:
        # A forked DataLoader worker inherits _fs without pickling; async filesystems (HTTP, S3) refuse a fork's use.
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._path = fsspec.core.url_to_fs(self.root, **self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def _problem(self, name: str, data: bytes) -> str | None:
        entry = self.entries[name]
        if len(data) != entry["bytes"]:
            return f"{name}: {len(data)} bytes, manifest says {entry['bytes']}"
        if self.verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{name}: sha256 does not match the manifest's {entry['sha256'][:12]}... (corrupt or replaced)"
        return None

    def read(self, name: str) -> bytes:
        if name not in self.entries:
            raise LoaderError(f"{name}: not in the manifest, so not part of the dataset")
        fs = self._filesystem()
        remote = not is_local(fs)
        cached = self.cache_dir / f"{self.entries[name]['sha256']}.tar"
        use_cache = remote and self.entries[name]["bytes"] <= self.cache_bytes
        if use_cache:
            try:
                data = cached.read_bytes()
            except FileNotFoundError:
                pass
            else:
                if self._problem(name, data) is None:
                    with contextlib.suppress(FileNotFoundError):  # evicted by another worker meanwhile
                        os.utime(cached)  # mtime is the LRU clock
                    return data
                cached.unlink(missing_ok=True)
        with fs.open(join(self._path, name), "rb") as f:
            data = f.read()
        if (problem := self._problem(name, data)) is not None:
            raise LoaderError(problem)
        if use_cache:
            self._store(cached, data)
        return data

    def _store(self, final: Path, data: bytes) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(final, data)
        files = []
        for p in self.cache_dir.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another worker meanwhile
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.cache_bytes:
                break
            if p != final:
                p.unlink(missing_ok=True)
                total -= size


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kmim" / "shards"
