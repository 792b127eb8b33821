"""Input sources: plan a dataset into input shards, then read one input shard as raw samples.

Kinds: an ImageFolder tree (label = class folder, chunked by ``shard_size``), WebDataset tars (one
input shard per tar; a path, directory, brace pattern or fsspec URL), Parquet files (row ranges of
``shard_size``), and the built-in sample (scikit-learn's digits, upscaled to 64 px PNG).
Planning only lists and stats files; reading happens in the stage that owns the shard.

Input files are regular files only: planning leaves out FIFOs, sockets, devices and symlinks to them, which
are never opened. No image is read over ``max_image_bytes`` (a file's stat size, a tar member's header size,
a Parquet value's length); it is skipped as ``too_large``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import itertools
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow.parquet as pq
from braceexpand import braceexpand
from PIL import Image

from kmim.datasets.preprocess import (
    BAD_LABEL,
    IMAGE_EXTS,
    NO_IMAGE,
    TOO_LARGE,
    UNDECODABLE,
    UNREADABLE,
    SkipImage,
)
from kmim.datasets.shards import Unread, iter_tar
from kmim.storage import is_local

BUILTIN = "builtin:digits"
MAX_LABEL = 2**31 - 1  # labels are integers in [-1, MAX_LABEL]; -1 (or none) means unlabeled
_TAR_MEMBERS = frozenset((*IMAGE_EXTS, "cls", "json"))  # the members of an input tar sample that are read


class InputError(ValueError):
    """The input cannot be planned; the message names the path or field."""


@dataclass(frozen=True)
class SourceSpec:
    """What the input is and how it is read: ``input`` (a path, brace pattern or fsspec URL; None = the built-in
    sample), ``shard_size`` samples per input shard (folders, Parquet, the built-in sample), the Parquet
    ``image_column`` and ``label_column``, and ``max_image_bytes``, the bytes above which an image is skipped
    unread."""

    input: str | None
    shard_size: int
    image_column: str
    label_column: str | None
    max_image_bytes: int


@dataclass(frozen=True)
class InputShard:
    """One unit of work. ``files`` are (relative path, label) for folders; rows are [start, stop)."""

    index: int
    kind: str  # "folder" | "tar" | "parquet" | "builtin"
    location: str
    files: tuple[tuple[str, int | None], ...] = ()
    start: int = 0
    stop: int = 0

    def describe(self) -> str:
        return {"folder": f"{self.location} files[{self.start}:{self.stop}]", "tar": self.location,
                "parquet": f"{self.location} rows[{self.start}:{self.stop}]",
                "builtin": f"{BUILTIN} [{self.start}:{self.stop}]"}[self.kind]


@dataclass(frozen=True)
class RawSample:
    source: str  # stable id of the input within the dataset (relative path, tar/key, file#row)
    data: bytes | None
    label: int | None
    skip: str | None = None  # reason known before decoding (e.g. a tar sample without an image)
    detail: str = ""  # what made it skip, for the log


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _file_name(path: str) -> str:
    """The last component of a path or URL, without any query or fragment (a presigned URL's signature)."""
    return posixpath.basename(urlsplit(path).path if "://" in path else path)


def _kind(path: str) -> str | None:
    """"tar" or "parquet" by the file name's suffix (any case), else None."""
    name = _file_name(path).lower()
    return "tar" if name.endswith(_TAR_SUFFIXES) else "parquet" if name.endswith(".parquet") else None


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def _expand(spec: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, _ = fsspec.core.url_to_fs(next(iter(braceexpand(spec))))
    paths: list[str] = []
    for part in braceexpand(spec):
        _, path = fsspec.core.url_to_fs(part)
        paths.extend(sorted(fs.glob(path)) if fsspec.core.has_magic(path) else [path])
    return fs, paths


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _file_type(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """"file", "directory" or "other" (a FIFO, socket, device or broken symlink: never to be opened) of ``path``,
    following symlinks."""
    if is_local(fs):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return "other"
        return "file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "other"
    return fs.info(path).get("type", "other")


def _regular_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The regular files under ``root``, sorted."""
    if is_local(fs):  # fsspec types a symlink by the link itself, so stat each file
        return sorted(p for p in fs.find(root, withdirs=False) if _file_type(fs, p) == "file")
    return sorted(p for p, info in fs.find(root, withdirs=False, detail=True).items() if info.get("type") == "file")


def recorded_name(name: str) -> str:
    """``name`` (a source or a class folder) as a dataset records it: valid UTF-8 text. A file name that is not
    UTF-8 (on POSIX its undecodable bytes arrive as lone surrogates) has those bytes written as ``\\xNN``; the
    sample key is still that of the real name (:func:`kmim.pipeline.decoding.sample_key`), so keys stay unique."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def _plan_folder(fs, root: str, listing: list[str], shard_size: int) -> tuple[list[InputShard], list[str] | None]:
    rel = sorted(posixpath.relpath(p, root) for p in listing if _is_image(p))
    if not rel:
        raise InputError(f"input {root!r}: no image files ({', '.join(IMAGE_EXTS)}) found")
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    label_of = {c: i for i, c in enumerate(classes)}
    files = [(r, label_of[r.split("/", 1)[0]] if "/" in r else None) for r in rel]
    location = _url(fs, root)
    shards = [InputShard(i, "folder", location, tuple(files[a:b]), a, b)
              for i, (a, b) in enumerate(_chunks(len(files), shard_size))]
    return shards, [recorded_name(c) for c in classes] or None


def _plan_parquet(fs, paths: list[str], source: SourceSpec) -> list[InputShard]:
    shards: list[InputShard] = []
    for path in paths:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
            f.seek(0)
            rows = pq.ParquetFile(f).metadata.num_rows
        if source.image_column not in schema.names:
            raise InputError(f"{path}: field 'image_column': column {source.image_column!r} not found "
                             f"(columns: {', '.join(schema.names)})")
        shards.extend(InputShard(len(shards), "parquet", _url(fs, path), (), a, b)
                      for a, b in _chunks(rows, source.shard_size))
    return shards


@functools.cache
def _builtin_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images float64 [1797, 8, 8] in 0..16, targets int [1797]), read from the file
    ``load_digits`` reads, without importing scikit-learn (0.9 s, in the driver and in every worker)."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise InputError("the built-in sample needs scikit-learn (pip install scikit-learn), or give --input")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def plan_inputs(source: SourceSpec) -> tuple[list[InputShard], list[str] | None]:
    """Split ``source.input`` into ordered shards; returns (shards, class names or None)."""
    if source.input is None:
        n = len(_builtin_images()[1])
        shards = [InputShard(i, "builtin", BUILTIN, (), a, b) for i, (a, b) in enumerate(_chunks(n, source.shard_size))]
        return shards, [str(d) for d in range(10)]
    fs, paths = _expand(source.input)
    if not paths or not all(fs.exists(p) for p in paths):
        missing = next((p for p in paths if not fs.exists(p)), source.input)
        raise InputError(f"field 'input': {missing!r} does not exist")
    if len(paths) == 1 and fs.isdir(paths[0]):
        root = paths[0]
        listing = _regular_files(fs, root)
        tars = [p for p in listing if _kind(p) == "tar"]
        parquets = [p for p in listing if _kind(p) == "parquet"]
        if tars and not parquets:
            paths = tars
        elif parquets and not tars:
            paths = parquets
        else:
            return _plan_folder(fs, root, listing, source.shard_size)
    elif special := next((p for p in paths if _file_type(fs, p) == "other"), None):
        raise InputError(f"field 'input': {special!r} is not a regular file")
    if all(_kind(p) == "tar" for p in paths):
        return [InputShard(i, "tar", _url(fs, p)) for i, p in enumerate(paths)], None
    if all(_kind(p) == "parquet" for p in paths):
        return _plan_parquet(fs, paths, source), None
    raise InputError(f"field 'input': {source.input!r} is not an image folder, .tar shards or .parquet files")


def _over_cap(size: int, cap: int) -> str:
    return f"{size} bytes > max_image_bytes ({cap})"


def _read_file(fs: fsspec.AbstractFileSystem, path: str, cap: int) -> bytes:
    """The bytes of the image file at ``path``, read only if at most ``cap`` bytes; raises :class:`SkipImage`.

    A local file is stat-ed first: over the cap, or no longer a regular file, it is never opened; any OS
    error reading it is a skip (``unreadable``). Remote errors propagate: they may be transient."""
    if not is_local(fs):
        with fs.open(path, "rb") as f:
            data = f.read(cap + 1)
    else:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise SkipImage(UNREADABLE, "not a regular file")
            if st.st_size > cap:
                raise SkipImage(TOO_LARGE, _over_cap(st.st_size, cap))
            with open(path, "rb") as f:
                # Sized by the stat, not the cap: read(n) allocates n bytes first (64 MiB per small image).
                data = f.read(st.st_size + 1)
                if len(data) > st.st_size:  # it grew since the stat
                    data += f.read(cap + 1 - len(data))
        except OSError as e:
            raise SkipImage(UNREADABLE, f"{type(e).__name__}: {e}") from None
    if len(data) > cap:  # the file grew since it was stat-ed, or its size was unknown
        raise SkipImage(TOO_LARGE, f"more than max_image_bytes ({cap}) bytes")
    return data


def _read_folder(shard: InputShard, cap: int) -> Iterator[RawSample]:
    fs, root = fsspec.core.url_to_fs(shard.location)
    for rel, label in shard.files:
        try:
            data = _read_file(fs, posixpath.join(root, rel), cap)
        except SkipImage as e:
            yield RawSample(rel, None, label, e.reason, e.detail)
        else:
            yield RawSample(rel, data, label)


def _label(value: object) -> int | None:
    """``value`` as a label: None or an integer in [-1, MAX_LABEL]; raises :class:`SkipImage` (``bad_label``)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= MAX_LABEL):
        return value
    raise SkipImage(BAD_LABEL, f"{str(value)[:40]!r} is not an integer in [-1, {MAX_LABEL}]")


def _label_member(sample: dict, ext: str) -> bytes:
    value = sample[ext]
    if isinstance(value, Unread):
        raise SkipImage(BAD_LABEL, f".{ext} member of {value.size} bytes")
    return value


def _tar_label(sample: dict) -> int | None:
    """The label of a tar sample: its ``.cls`` member (decimal text), else the ``label`` of its ``.json``;
    raises :class:`SkipImage` (``bad_label``)."""
    if "cls" in sample:
        text = _label_member(sample, "cls")
        if not re.fullmatch(rb"\s*-?[0-9]{1,10}\s*", text):
            raise SkipImage(BAD_LABEL, f".cls {text[:40]!r} is not a decimal integer")
        return _label(int(text))
    if "json" in sample:
        try:
            meta = json.loads(_label_member(sample, "json"))
        except (ValueError, RecursionError) as e:
            raise SkipImage(BAD_LABEL, f".json does not parse: {e}") from None
        return _label(meta.get("label")) if isinstance(meta, dict) else None
    return None


def _tar_sample(source: str, sample: dict, cap: int) -> RawSample:
    """A raw sample from a tar sample: its first member in IMAGE_EXTS order is the image."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return RawSample(source, None, None, NO_IMAGE)
    try:
        label = _tar_label(sample)
    except SkipImage as e:
        return RawSample(source, None, None, e.reason, e.detail)
    if isinstance(sample[ext], Unread):
        return RawSample(source, None, label, TOO_LARGE, _over_cap(sample[ext].size, cap))
    return RawSample(source, sample[ext], label)


def _read_tar(shard: InputShard, cap: int) -> Iterator[RawSample]:
    name = _file_name(shard.location)
    with fsspec.open(shard.location, "rb") as f:
        samples = iter_tar(f, shard.location, input_tar=True, max_member_bytes=cap, keep=_TAR_MEMBERS.__contains__)
        for sample in samples:
            yield _tar_sample(f"{name}/{sample['__key__']}", sample, cap)


def _read_parquet(shard: InputShard, source: SourceSpec) -> Iterator[RawSample]:
    name = _file_name(shard.location)
    with fsspec.open(shard.location, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [source.image_column]
        if source.label_column and source.label_column in pf.schema_arrow.names:
            columns.append(source.label_column)
        # Read only the row groups overlapping [start, stop).
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < shard.stop and offset + n > shard.start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=columns).slice(shard.start - first, shard.stop - shard.start)
    images = table.column(source.image_column).to_pylist()
    labels = table.column(source.label_column).to_pylist() if len(columns) > 1 else [None] * len(images)
    for row, (img, label) in enumerate(zip(images, labels, strict=True), start=shard.start):
        yield _parquet_sample(f"{name}#{row}", img.get("bytes") if isinstance(img, dict) else img, label,
                              source.max_image_bytes)


def _parquet_sample(source: str, data: object, raw_label: object, cap: int) -> RawSample:
    """A raw sample from a Parquet row's image value (bytes or None) and label value."""
    try:
        label = _label(raw_label)
    except SkipImage as e:
        return RawSample(source, None, None, e.reason, e.detail)
    if data is not None and not isinstance(data, bytes):
        return RawSample(source, None, label, UNDECODABLE, f"a {type(data).__name__} value, not bytes")
    if data is not None and len(data) > cap:
        return RawSample(source, None, label, TOO_LARGE, _over_cap(len(data), cap))
    return RawSample(source, data, label)


def _read_builtin(shard: InputShard) -> Iterator[RawSample]:
    images, targets = _builtin_images()
    for i in range(shard.start, shard.stop):
        pixels = np.rint(images[i] * (255.0 / 16.0)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").resize((64, 64), Image.Resampling.BILINEAR).save(buf, "PNG")
        yield RawSample(f"sklearn-digits/{i:04d}.png", buf.getvalue(), int(targets[i]))


def read_shard(shard: InputShard, source: SourceSpec, start: int = 0) -> Iterator[RawSample]:
    """Yield the raw samples of one input shard of ``source``, in a fixed order, from the ``start``-th on."""
    if shard.kind == "folder":
        return _read_folder(replace(shard, files=shard.files[start:]), source.max_image_bytes)
    if shard.kind == "builtin":
        return _read_builtin(replace(shard, start=shard.start + start))
    if shard.kind == "tar":
        return itertools.islice(_read_tar(shard, source.max_image_bytes), start, None)
    return itertools.islice(_read_parquet(shard, source), start, None)
