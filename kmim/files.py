"""File primitives, the ground floor of kmim: hidden temporary names, atomic writes, sha256 of files.

Every file kmim writes goes through here, so none is ever visible half-written under its final name: it is
written to a hidden temporary sibling (:func:`tmp_path`, matching :data:`TMP_GLOB`) and renamed onto its final
name with ``os.replace`` once complete; on any failure the temporary file is removed. This module imports
nothing of kmim, so every other module may import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

HASH_CHUNK = 1 << 20  # bytes read per step when hashing a stream
WRITE_BUFFER = 1 << 20  # bytes an AtomicFile gathers before a system call: few calls for many small writes
TMP_GLOB = ".*.tmp-*"  # every name tmp_path gives, e.g. for sweeping the leftovers of a killed writer


def tmp_path(final: str | os.PathLike) -> Path:
    """A hidden, unique temporary sibling of ``final`` (``.<name>.tmp-<8 hex>``); renamed onto it once complete."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write(final: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a :func:`tmp_path` of ``final``, then rename it onto ``final``; if anything fails the
    temporary file is removed and ``final`` is untouched. For writers that want a path (safetensors, Parquet)."""
    tmp = tmp_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Store ``data`` as the file ``final``, atomically (see :func:`atomic_write`)."""
    atomic_write(final, lambda tmp: tmp.write_bytes(data))


class AtomicFile:
    """A binary file written under a :func:`tmp_path` name, hashed (sha256) and counted while it is written.

    :meth:`finish` closes it and returns (hex sha256, size in bytes) without re-reading it; :meth:`commit` renames
    it onto ``final``; :meth:`abort` removes it. As a context manager, the block's normal end commits (unless
    :meth:`commit` or :meth:`abort` was already called) and an exception aborts::

        with AtomicFile(path) as f:
            np.save(f, array)
        f.sha256, f.size  # of the committed file
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.tmp = tmp_path(self.final)
        self._file: IO[bytes] = open(  # noqa: SIM115 - closed by finish() / abort()
            self.tmp, "wb", buffering=WRITE_BUFFER)
        self._hash = hashlib.sha256()
        self.size = 0  # bytes written so far
        self.done = False  # committed or aborted

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data``; return its length in bytes."""
        n = self._file.write(data)
        self._hash.update(data)
        self.size += n
        return n

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far."""
        return self._hash.hexdigest()

    def close(self) -> None:
        """Close the temporary file (idempotent); it stays under its temporary name."""
        self._file.close()

    def finish(self) -> tuple[str, int]:
        """Close the file; return (hex sha256, size in bytes) of its content."""
        self.close()
        return self.sha256, self.size

    def commit(self) -> None:
        """Finish the file and rename it onto ``final``."""
        self.finish()
        os.replace(self.tmp, self.final)
        self.done = True

    def abort(self) -> None:
        """Discard the file: the temporary file is removed even when closing it fails (a full disk)."""
        with contextlib.suppress(Exception):
            self.close()
        self.tmp.unlink(missing_ok=True)
        self.done = True

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.done:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    """(hex sha256, size in bytes) of what is left to read in ``f``, read :data:`HASH_CHUNK` bytes at a time."""
    h, n = hashlib.sha256(), 0
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a local file."""
    with open(path, "rb") as f:
        return sha256_stream(f)
