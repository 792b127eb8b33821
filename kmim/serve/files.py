"""What ``kmim serve`` may serve, and byte ranges of it.

A :class:`FileTable` maps request names to :class:`ServedFile` entries built once at start: for a dataset,
exactly the files its manifest lists (``manifest.json``, every shard and its Parquet index, the codebook); for a
report, its ``index.html`` and the PNGs that page names. A request is answered by looking its decoded path up in
a table, never by turning it into a filesystem path, so nothing outside the table is reachable whatever the
encoding tricks.

Each entry carries the file's sha256 (the ETag): a shard's from the manifest; the manifest's, the indexes' and
the codebook's (the manifest lists those without a digest) and the report's computed at start. Local files are
served only while they are regular files (not symlinks) of the size recorded at start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from kmim.datasets.manifest import MANIFEST, parse_manifest
from kmim.files import sha256_file
from kmim.storage import is_local, join, list_sizes, open_url, sha256_remote, url_of

log = logging.getLogger("kmim")

CHUNK = 4 << 20  # bytes read per step of a response body
DIGEST_THREADS = 8  # files hashed at once at start (the indexes and the codebook)
CONTENT_TYPES = {
    ".tar": "application/x-tar",
    ".json": "application/json",
    ".parquet": "application/vnd.apache.parquet",
    ".safetensors": "application/octet-stream",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
}
REPORT_INDEX = "index.html"
# A PNG a report may name: a relative path of plain components (no '..', no hidden names), not under data/.
_REPORT_PNG = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]*/)*[A-Za-z0-9_-][A-Za-z0-9_.-]*\.png")
_PNG_REF = re.compile(r"[A-Za-z0-9_./-]+\.png(?![A-Za-z0-9_.-])")


class NotServable(OSError):
    """A listed file that is missing, not a regular file (a symlink, a directory) or not of its listed size."""


class ServeError(ValueError):
    """A dataset or report that cannot be served; the message names the file."""


@dataclass(frozen=True)
class ServedFile:
    """One file a table serves: ``name`` as requested, ``location`` on the table's filesystem."""

    name: str
    location: str
    size: int
    sha256: str
    content_type: str
    data: bytes | None = None  # served from memory: the manifest exactly as read and checked at start

    @property
    def etag(self) -> str:
        """The strong entity tag: the quoted sha256."""
        return f'"{self.sha256}"'


def content_type(name: str) -> str:
    """The media type of a served file, by its suffix."""
    return CONTENT_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream")


def regular_size(path: str) -> int:
    """The size of local file ``path``; :class:`NotServable` unless it is a regular file (a symlink is not)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotServable(f"{path}: missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotServable(f"{path}: not a regular file")
    return st.st_size


class FileTable:
    """The files one mount serves, by request name, on one filesystem."""

    def __init__(self, fs: AbstractFileSystem, files: dict[str, ServedFile]):
        self.fs, self.files, self.local = fs, files, is_local(fs)

    def get(self, name: str) -> ServedFile | None:
        """The file served as ``name``, or None: the only way from a request to a file."""
        return self.files.get(name)

    def check(self, f: ServedFile) -> None:
        """Raise :class:`NotServable` unless ``f`` can be served now: a local file must still be a regular file of
        its recorded size (an object store's is checked chunk by chunk while it is read)."""
        if self.local and f.data is None and regular_size(f.location) != f.size:
            raise NotServable(f"{f.name}: its size is no longer the {f.size} bytes listed")

    def chunks(self, f: ServedFile, start: int, stop: int) -> Iterator[bytes]:
        """Bytes ``[start, stop)`` of ``f``, :data:`CHUNK` at a time; raises :class:`NotServable` when the file
        changed under it."""
        if f.data is not None:
            yield f.data[start:stop]
        elif self.local:
            yield from _local_chunks(f, start, stop)
        else:
            yield from _remote_chunks(self.fs, f, start, stop)


def _local_chunks(f: ServedFile, start: int, stop: int) -> Iterator[bytes]:
    fd = os.open(f.location, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            raise NotServable(f"{f.name}: no longer a regular file of {f.size} bytes")
        fh.seek(start)
        while start < stop:
            data = fh.read(min(CHUNK, stop - start))
            if not data:
                raise NotServable(f"{f.name}: truncated while served")
            start += len(data)
            yield data


def _remote_chunks(fs: AbstractFileSystem, f: ServedFile, start: int, stop: int) -> Iterator[bytes]:
    while start < stop:
        end = min(start + CHUNK, stop)
        data = fs.cat_file(f.location, start=start, end=end)
        if len(data) != end - start:
            raise NotServable(f"{f.name}: {len(data)} bytes at {start}, expected {end - start} (changed while served)")
        start = end
        yield data


def _read_manifest(fs: AbstractFileSystem, root: str) -> tuple[bytes, dict]:
    """The manifest's bytes and content, checked with :func:`check_manifest` before any file it names is used."""
    path = join(root, MANIFEST)
    where = url_of(fs, path)
    try:
        if is_local(fs):
            regular_size(path)
        raw = fs.cat_file(path)
    except (FileNotFoundError, NotServable):
        raise ServeError(f"{where}: no manifest (the dataset is missing or was never committed)") from None
    return raw, parse_manifest(raw, where)


def _sizes(fs: AbstractFileSystem, root: str, names: list[str]) -> dict[str, int]:
    """``{name: size}`` of the listed files; :class:`ServeError` naming the first that is missing (or, locally,
    not a regular file)."""
    if is_local(fs):
        try:
            return {name: regular_size(join(root, name)) for name in names}
        except NotServable as e:
            raise ServeError(f"{e}: listed in the manifest (run kmim verify)") from None
    found = list_sizes(fs, root)  # one listing; a store that cannot list (HTTP) is asked file by file
    for name in names:
        if name not in found:
            try:
                found[name] = fs.info(join(root, name)).get("size")
            except FileNotFoundError:
                found[name] = None
            if found[name] is None:
                raise ServeError(f"{url_of(fs, join(root, name))}: missing, listed in the manifest (run kmim verify)")
    return {name: found[name] for name in names}


def _digests(fs: AbstractFileSystem, root: str, sizes: dict[str, int]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``sizes`` names, hashed concurrently; their sizes must not have changed."""
    names = list(sizes)
    with ThreadPoolExecutor(DIGEST_THREADS) as pool:
        found = dict(zip(names, pool.map(lambda name: sha256_remote(fs, join(root, name)), names), strict=True))
    for name, (_, size) in found.items():
        if size != sizes[name]:
            raise ServeError(f"{url_of(fs, join(root, name))}: changed while kmim serve started")
    return {name: digest for name, (digest, _) in found.items()}


def data_files(root: str, storage_options: dict | None = None) -> FileTable:
    """The table of a committed dataset at ``root`` (a directory or any fsspec URL): its manifest and exactly the
    files it lists, each present with its listed size. Raises :class:`ServeError` or
    :class:`~kmim.datasets.manifest.ManifestError` naming the file otherwise."""
    fs, path = open_url(root, storage_options)
    raw, manifest = _read_manifest(fs, path)
    shards = {e["path"]: e for e in manifest["shards"]}
    others = [e["index"] for e in manifest["shards"]] + [manifest["codebook"]["path"]]
    sizes = _sizes(fs, path, [*shards, *others])
    for name, entry in shards.items():
        if sizes[name] != entry["bytes"]:
            raise ServeError(f"{url_of(fs, join(path, name))}: {sizes[name]} bytes, the manifest lists "
                             f"{entry['bytes']} (run kmim verify)")
    digests = _digests(fs, path, {name: sizes[name] for name in others})
    files = {MANIFEST: ServedFile(MANIFEST, join(path, MANIFEST), len(raw), hashlib.sha256(raw).hexdigest(),
                                  content_type(MANIFEST), raw)}
    for name, size in sizes.items():
        digest = shards[name]["sha256"] if name in shards else digests[name]
        files[name] = ServedFile(name, join(path, name), size, digest, content_type(name))
    return FileTable(fs, files)


def _report_pngs(directory: Path, html: str) -> list[str]:
    """The PNGs ``html`` names that lie as regular files inside ``directory``: relative plain paths, reached
    through no symlink, not under ``data/`` (the dataset's mount)."""
    names = []
    base = os.path.realpath(directory)
    for ref in sorted(set(_PNG_REF.findall(html))):
        name = ref.removeprefix("./")
        if not _REPORT_PNG.fullmatch(name) or ".." in name or name.startswith("data/"):
            continue
        path = os.path.join(base, name)
        try:
            regular_size(path)
        except NotServable as e:
            log.warning("the report names %s, which is not served: %s", name, e)
            continue
        if os.path.realpath(path) == path:
            names.append(name)
    return names


def report_files(directory: Path) -> FileTable:
    """The table of a report in ``directory``: its ``index.html`` and the PNGs that page names."""
    index = os.path.join(os.path.realpath(directory), REPORT_INDEX)
    try:
        regular_size(index)
    except NotServable as e:
        raise ServeError(f"{e}: not a report (no index.html)") from None
    names = [REPORT_INDEX, *_report_pngs(directory, Path(index).read_text(encoding="utf-8", errors="replace"))]
    files = {}
    for name in names:
        path = os.path.join(os.path.realpath(directory), name)
        digest, size = sha256_file(path)
        files[name] = ServedFile(name, path, size, digest, content_type(name))
    return FileTable(LocalFileSystem(), files)
