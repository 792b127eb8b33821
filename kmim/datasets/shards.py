"""Shard tar I/O: an atomic WebDataset-layout writer and a reader that validates every member name."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO

import numpy as np
import webdataset as wds

# key.ext where the key has no dot and the extension is one or more dotted words (e.g. "tokens.npy").
_MEMBER = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)$")
HASH_CHUNK = 1 << 20


class ShardError(ValueError):
    """A shard that breaks the contract: bad member name, member type, duplicate or malformed sample."""


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, expect: tuple[str, tuple[int, ...]] | None = None) -> np.ndarray:
    """Array from ``.npy`` bytes, never unpickling.

    With ``expect`` = (dtype, shape), bytes that carry exactly the header kmim writes for that array are
    read with ``np.frombuffer``, skipping ``np.load``'s header parsing (most of its cost on a small grid).
    """
    if expect is not None:
        header, nbytes = _npy_header(*expect)
        if len(data) == len(header) + nbytes and data.startswith(header):
            return np.frombuffer(data, np.dtype(expect[0]), offset=len(header)).reshape(expect[1]).copy()
    return np.load(io.BytesIO(data), allow_pickle=False)


@lru_cache(maxsize=16)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> tuple[bytes, int]:
    """The header ``encode_npy`` writes for an array of this dtype and shape, and the payload size."""
    arr = np.zeros(shape, np.dtype(dtype))
    return encode_npy(arr)[: -arr.nbytes or None], arr.nbytes


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """Return (hex sha256, size in bytes) of a local file."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def tmp_path(final: Path) -> Path:
    """A hidden temporary sibling of ``final``; renamed onto it once complete."""
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


class ShardWriter:
    """Write samples into ``<final>`` atomically: a hidden temp file, renamed by :meth:`commit`.

    Samples are dicts ``{"__key__": str, ext: bytes}``; tars are reproducible (mtime 0, fixed owner).
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = tmp_path(self.final)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, user="kmim", group="kmim")
        self.samples = 0

    def write(self, sample: dict[str, bytes | str]) -> None:
        self._tar.write(sample)
        self.samples += 1

    def close(self) -> tuple[str, int]:
        """Finish the tar; return (sha256, bytes) of the temp file."""
        self._tar.close()
        self._file.close()
        return sha256_file(self.tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the tar stream may be mid-member; it is discarded anyway
            self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def iter_tar(fileobj: IO[bytes], name: str = "<tar>") -> Iterator[dict[str, bytes | str]]:
    """Yield samples ``{"__key__": key, ext: bytes}`` from a WebDataset-layout tar stream.

    Members must be regular files named ``key.ext`` (no directories, no path separators, no ``..``);
    a member of a sample must follow the previous member of the same sample. Raises :class:`ShardError`.
    """
    seen: set[str] = set()
    current: dict[str, bytes | str] | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                raise ShardError(f"{name}: member {member.name!r} is not a regular file")
            match = _MEMBER.match(member.name)
            if match is None:
                raise ShardError(f"{name}: invalid member name {member.name!r} (expected key.ext, no paths)")
            key, ext = match.groups()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                if key in seen:
                    raise ShardError(f"{name}: sample key {key!r} appears twice")
                seen.add(key)
                current = {"__key__": key}
            if ext in current:
                raise ShardError(f"{name}: duplicate member {member.name!r}")
            data = tar.extractfile(member)
            current[ext] = data.read() if data is not None else b""
    if current is not None:
        yield current


def sample_meta(sample: dict, name: str) -> dict:
    """Parse and return a sample's ``.json`` member."""
    try:
        return json.loads(sample["json"])
    except (KeyError, ValueError) as e:
        raise ShardError(f"{name}: sample {sample.get('__key__')!r} has no valid .json member ({e})") from None
