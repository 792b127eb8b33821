"""Shard tar I/O: an atomic WebDataset-layout writer and a reader that validates every member name."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import struct
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np

from kmim.files import AtomicFile

# key.ext where the key has no dot and the extension is one or more dotted words (e.g. "tokens.npy").
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MEMBER = re.compile(rf"^({_KEY.pattern})\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)$")
# An input tar's member, WebDataset style: the key is the path up to the first dot of the last component
# ("train/n01440764_10026.JPEG" -> key "train/n01440764_10026"); never used as a path, only as a source id.
_INPUT_MEMBER = re.compile(r"^((?:[^/\x00]+/)*[^/.\x00]+)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)$")


class ShardError(ValueError):
    """A shard that breaks the contract: bad member name, member type, duplicate or malformed sample."""


def _np_save(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    """The ``.npy`` bytes ``np.save`` writes for ``arr`` (never pickled); the header is built once per dtype and
    shape (formatting it is most of ``np.save``'s cost on a small grid)."""
    if arr.flags.f_contiguous and not arr.flags.c_contiguous:  # np.save stores it in Fortran order
        return _np_save(arr)
    return _npy_header(arr.dtype, arr.shape)[0] + arr.tobytes()


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
def _npy_header(dtype: str | np.dtype, shape: tuple[int, ...]) -> tuple[bytes, int]:
    """The header ``np.save`` writes for a C-order array of this dtype and shape, and the payload size in bytes."""
    arr = np.zeros(shape, np.dtype(dtype))
    return _np_save(arr)[: -arr.nbytes or None], arr.nbytes


def _member_template() -> tuple[bytes, bytes]:
    """(the PAX extended header before each member, the ustar header of a member named "" of 0 bytes), as tarfile
    writes them for webdataset's ``TarWriter(mtime=0.0, user="kmim", group="kmim")``, the writer kmim's shards were
    first written with: its float mtime makes tarfile's default PAX format record ``mtime=0.0`` before every
    member, and the shards' bytes (their sha256 in every manifest) must not change."""
    info = tarfile.TarInfo("")
    info.mtime, info.mode, info.uname, info.gname = 0.0, 0o444, "kmim", "kmim"
    blob = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return blob[: -tarfile.BLOCKSIZE], blob[-tarfile.BLOCKSIZE:]


_PAX, _TEMPLATE = _member_template()
# The ustar header's fields: name, mode + uid + gid, size, mtime, checksum, then type, owner and the rest.
_USTAR = struct.Struct("100s24s12s12s8s356s")
_, _IDS, _, _MTIME, _, _REST = _USTAR.unpack(_TEMPLATE)
_CHECKSUM_BASE = sum(_IDS) + sum(_MTIME) + sum(b" " * 8) + sum(_REST)  # the checksum counts its field as spaces
_ZEROS = bytes(tarfile.BLOCKSIZE)
_MAX_MEMBER = 8**11  # bytes: the ustar size field's limit (11 octal digits)


def _member(name: str, data: bytes | bytearray) -> tuple[bytes, bytes, bytes | bytearray, bytes]:
    """The tar blocks of member ``name`` holding ``data``: PAX header, ustar header, data, zero padding to 512."""
    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"shard member {name!r} is a {type(data).__name__}, not bytes")
    if _MEMBER.fullmatch(name) is None or len(name) > 100 or len(data) >= _MAX_MEMBER:
        raise ValueError(f"shard member {name!r} of {len(data)} bytes: not a key.ext name of at most 100 "
                         f"characters (no paths) or not under {_MAX_MEMBER} bytes")
    name_field, size_field = name.encode("ascii"), b"%011o\0" % len(data)
    checksum = b"%06o\0 " % (_CHECKSUM_BASE + sum(name_field) + sum(size_field))
    header = _USTAR.pack(name_field, _IDS, size_field, _MTIME, checksum, _REST)
    return _PAX, header, data, _ZEROS[: -len(data) % tarfile.BLOCKSIZE]


class ShardWriter:
    """Write samples into the shard tar ``final`` atomically: under a hidden temporary name until committed.

    Samples are dicts ``{"__key__": str, ext: bytes}``; each is stored as members ``<key>.<ext>`` in sorted ``ext``
    order (entries named ``_...`` are metadata, not stored), each member name one that :func:`iter_tar` accepts.
    Tars are reproducible (mtime 0, fixed owner) and byte-identical to what tarfile writes for webdataset's
    ``TarWriter`` with those settings; each sample's headers are built from a template and the sample reaches the
    file in one write. The tar is hashed while it is written (:class:`~kmim.files.AtomicFile`), never re-read.
    Use it as a context manager::

        with ShardWriter(out / "shard-00000.tar") as shard:
            for sample in samples:
                shard.write(sample)
            sha256, nbytes = shard.finish()  # the tar is complete: its hex sha256 and size in bytes
            ...                              # whatever must exist before the tar (its index)
            shard.commit()                   # the tar appears under its final name

    An exception in the block aborts (the temporary file is removed); a block that ends normally commits the
    shard if :meth:`commit` was not called.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self._file = AtomicFile(self.final)
        self._ended = False  # the end-of-archive blocks are written
        self.samples = 0

    def write(self, sample: Mapping[str, bytes | bytearray | str]) -> None:
        """Append one sample; a sample with a bad member raises ValueError and leaves the tar as it was."""
        if self._ended:
            raise ValueError(f"{self.final}: the shard is finished; nothing more can be written")
        key = sample["__key__"]
        if not (isinstance(key, str) and _KEY.fullmatch(key)):
            raise ValueError(f"shard member key {key!r} is not letters, digits, '_' and '-'")
        blocks = [b for ext in sorted(sample) if not ext.startswith("_") for b in _member(f"{key}.{ext}", sample[ext])]
        self._file.write(b"".join(blocks))
        self.samples += 1

    def _end(self) -> None:
        """Write the end of the archive once: two zero blocks, then zeros up to a whole tar record (10 KiB)."""
        if not self._ended:
            self._ended = True
            end = 2 * tarfile.BLOCKSIZE
            self._file.write(bytes(end + -(self._file.size + end) % tarfile.RECORDSIZE))

    def finish(self) -> tuple[str, int]:
        """End the tar; return (hex sha256, size in bytes) of the complete file. Nothing more can be written."""
        self._end()
        return self._file.finish()

    def commit(self) -> None:
        """End the tar (if :meth:`finish` was not called) and rename it onto ``final``."""
        self._end()
        self._file.commit()

    def abort(self) -> None:
        """Discard the shard: the temp file is removed even when closing it fails (a full disk)."""
        self._file.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._file.done:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise


class _Rejoined:
    """``head``, then the rest of ``f``: a read-only stream whose first bytes were read to sniff its compression."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self.head, self.f = head, f

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.f.read(size)
        data = self.head + self.f.read() if size < 0 else self.head[:size]
        self.head = b"" if size < 0 else self.head[size:]
        return data


_DECOMPRESS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _uncompressed(fileobj: IO[bytes]) -> IO[bytes]:
    """``fileobj`` as a plain stream: gzip, bzip2 and xz data are decompressed a bounded amount per read
    (tarfile's own ``r|*`` inflates each compressed block whole and re-slices the result: unbounded memory for a
    bzip2 bomb, quadratic time skipping a large gzip member)."""
    head = b""
    while len(head) < 6 and (more := fileobj.read(6 - len(head))):
        head += more
    stream = _Rejoined(head, fileobj)
    opener = next((o for magic, o in _DECOMPRESS if head.startswith(magic)), None)
    return opener(stream) if opener is not None else stream


@dataclass(frozen=True)
class Unread:
    """Stands in :func:`iter_tar`'s samples for a member over ``max_member_bytes``: ``size`` bytes, never read."""

    size: int


def iter_tar(fileobj: IO[bytes], name: str = "<tar>", *, input_tar: bool = False, max_member_bytes: int | None = None,
             keep: Callable[[str], bool] | None = None) -> Iterator[dict[str, bytes | str | Unread]]:
    """Yield samples ``{"__key__": key, ext: bytes}`` from a WebDataset-layout tar stream (gzip, bzip2, xz or plain).

    Members must be regular files named ``key.ext`` (no directories, no path separators, no ``..``);
    a member of a sample must follow the previous member of the same sample. Raises :class:`ShardError`.
    ``input_tar`` reads a tar given to kmim as input rather than one of its shards: directory entries are
    ignored, keys may hold directories (``dir/key.ext``) and extensions are lowercased. Members whose
    extension ``keep`` rejects are not read; a member over ``max_member_bytes`` is not read either (its size
    comes from its header): its value is :class:`Unread`.
    """
    seen: set[str] = set()
    current: dict[str, bytes | str | Unread] | None = None
    with tarfile.open(fileobj=_uncompressed(fileobj), mode="r|") as tar:
        for member in tar:
            if input_tar and member.isdir():
                continue
            if not member.isfile():
                raise ShardError(f"{name}: member {member.name!r} is not a regular file")
            match = (_INPUT_MEMBER if input_tar else _MEMBER).fullmatch(member.name.removeprefix("./"))
            if match is None or {".", ".."} & set(match.group(1).split("/")):
                layout = "[dir/]key.ext, no '.' or '..'" if input_tar else "key.ext, no paths"
                raise ShardError(f"{name}: invalid member name {member.name!r} (expected {layout})")
            key, ext = match.groups()
            ext = ext.lower() if input_tar else ext
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                if key in seen:
                    raise ShardError(f"{name}: sample key {key!r} appears twice")
                seen.add(key)
                current = {"__key__": key}
            if ext in current:
                raise ShardError(f"{name}: duplicate member {member.name!r}")
            if keep is not None and not keep(ext):
                continue
            if max_member_bytes is not None and member.size > max_member_bytes:
                current[ext] = Unread(member.size)
                continue
            data = tar.extractfile(member)
            current[ext] = data.read() if data is not None else b""
    if current is not None:
        yield current
