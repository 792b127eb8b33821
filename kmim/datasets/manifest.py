"""The dataset manifest (the commit) and the per-shard Parquet index beside each shard.

Layout of a dataset directory::

    manifest.json                  written last; a dataset without it does not exist
    codebook.safetensors           the tokenizer the token grids came from
    shard-00000.tar                WebDataset samples: <key>.<img ext>, <key>.tokens.npy, <key>.json
    shard-00000.index.parquet      one row per *input* sample: key, source, label, status, width, height

A shard is finished when its tar exists; the index is renamed into place before the tar, so a finished
shard always has its index. Shard statistics travel in the index's schema metadata, so a manifest can
be rebuilt from finished shards without re-reading the tars.

Readers take an optional fsspec filesystem ``fs`` (None = local disk) with paths inside it, so a dataset in
object storage is read the same way.

The contract is read here only: :func:`check_manifest` for a manifest, :class:`TokenCounts` for the token-by-label
histograms an index stores, and :func:`kmim.datasets.samples.check_sample` for each stored sample.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from kmim import __version__
from kmim.files import atomic_write
from kmim.storage import fs_path, join, put_bytes, url_of

FORMAT = "kmim-dataset/1"
MANIFEST = "manifest.json"
CODEBOOK = "codebook.safetensors"
JOB_FILE = "job.json"
FIT_REPORT = "fit-report.json"  # what kmim fit writes beside the codebook
_META_KEY = b"kmim.shard"
TOKEN_DTYPES = ("uint16", "int32")
# A plain file name directly inside the dataset directory: no separator, scheme, drive or leading dot.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest, shard index or codebook that breaks the dataset contract; the message names file and field."""

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("label", pa.int64()),
    ("status", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def index_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".index.parquet"


def write_index(final: Path, rows: list[dict], stats: dict) -> None:
    """Write the per-shard index atomically; ``stats`` (JSON-able) goes into the schema metadata."""
    # Built by pyarrow's JSON reader, not from Python objects: that conversion imports pandas (0.15-0.3 s in every
    # process that writes a shard); the table, hence the file, is the same.
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    options = pa_json.ParseOptions(explicit_schema=INDEX_SCHEMA, unexpected_field_behavior="error")
    table = pa_json.read_json(io.BytesIO(lines), read_options=pa_json.ReadOptions(use_threads=False),
                              parse_options=options) if rows else INDEX_SCHEMA.empty_table()
    table = table.replace_schema_metadata({_META_KEY: json.dumps(stats, sort_keys=True).encode()})
    atomic_write(final, lambda tmp: pq.write_table(table, tmp))


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def dataset_file(value: object, suffix: str, where: str, field: str) -> str:
    """``value`` if it is a plain ``*suffix`` file name directly inside the dataset directory, else ManifestError.

    Every path read from a manifest goes through here before anything is opened: relative, one component,
    no ``..``, not hidden, no URL or absolute path, and the expected suffix.
    """
    if not (isinstance(value, str) and _PLAIN_NAME.fullmatch(value) and value.endswith(suffix)
            and ".." not in value and len(value) > len(suffix)):
        raise ManifestError(f"{where}: field '{field}': {value!r} is not a plain {suffix} name inside the dataset "
                            "directory (relative, no directories, no '..', no URL)")
    return value


def check_manifest(manifest: object, where: str) -> dict:
    """Return ``manifest`` once its structure holds (format, file names, counts, digests, token grid, codebook);
    raise :class:`ManifestError` naming the first bad field otherwise."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{where}: format {got!r} is not {FORMAT!r}")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ManifestError(f"{where}: field 'shards' is not a list of shard entries")
    for i, e in enumerate(entries):
        field = f"shards[{i}]"
        name = dataset_file(e.get("path"), ".tar", where, f"{field}.path")
        if e.get("index") != index_name(name):
            dataset_file(e.get("index"), ".index.parquet", where, f"{field}.index")
            raise ManifestError(f"{where}: field '{field}.index': {e['index']!r} is not {index_name(name)!r}")
        for count in ("samples", "bytes", "inputs"):
            if not _is_count(e.get(count)):
                raise ManifestError(f"{where}: field '{field}.{count}': {e.get(count)!r} is not a count")
        if not (isinstance(e.get("sha256"), str) and _SHA256.fullmatch(e["sha256"])):
            raise ManifestError(f"{where}: field '{field}.sha256': not a sha256 hex digest")
    if len({e["path"] for e in entries}) != len(entries):
        raise ManifestError(f"{where}: field 'shards': a shard is listed twice")
    if sum(e["samples"] for e in entries) != manifest.get("samples"):
        raise ManifestError(f"{where}: field 'samples': the shards' sample counts do not add up to it")
    book = manifest.get("codebook")
    if not isinstance(book, dict):
        raise ManifestError(f"{where}: field 'codebook' is missing")
    dataset_file(book.get("path"), ".safetensors", where, "codebook.path")
    if not (_is_count(book.get("k")) and book["k"] >= 1):
        raise ManifestError(f"{where}: field 'codebook.k': {book.get('k')!r} is not a positive count")
    if not isinstance(manifest.get("tokenizer_id"), str):
        raise ManifestError(f"{where}: field 'tokenizer_id' is missing")
    grid = manifest.get("token_grid")
    shape = grid.get("shape") if isinstance(grid, dict) else None
    if not (isinstance(shape, list) and shape and all(_is_count(n) and n > 0 for n in shape)):
        raise ManifestError(f"{where}: field 'token_grid.shape': {shape!r} is not a list of positive sizes")
    if grid.get("dtype") not in TOKEN_DTYPES:
        raise ManifestError(f"{where}: field 'token_grid.dtype': {grid.get('dtype')!r} is not one of {TOKEN_DTYPES}")
    views = manifest.get("views")
    if len(shape) == 3 and not (isinstance(views, dict) and views.get("count") == shape[0] > 1):
        raise ManifestError(f"{where}: field 'views': a token grid of shape {shape} needs views.count {shape[0]} > 1")
    return manifest


class TokenCounts:
    """Token-by-label histograms: ``by_label[label]`` int64 [K] counts each token id over the grids of samples
    with that label (-1 = unlabeled).

    A shard index stores them in its stats as ``token_counts``: three equal-length integer columns ``label``,
    ``token``, ``count`` holding the nonzero entries, labels ascending, then token ids ascending.
    """

    def __init__(self, k: int):
        self.k = k
        self.by_label: dict[int, np.ndarray] = {}

    def _hist(self, label: int) -> np.ndarray:
        return self.by_label.setdefault(label, np.zeros(self.k, np.int64))

    def add_grid(self, tokens: np.ndarray, label: int | None) -> None:
        """Count the ids of a token grid (each in [0, K)) under ``label`` (None = -1)."""
        self._hist(-1 if label is None else label)[:] += np.bincount(tokens.ravel(), minlength=self.k)

    def add_columns(self, columns: dict[str, list[int]], where: str) -> None:
        """Add stored ``token_counts`` columns (see :func:`read_index_stats`); raises :class:`ManifestError`
        naming ``where`` when a token id is not below K."""
        if any(t >= self.k for t in columns["token"]):
            raise ManifestError(f"{where}: field 'token_counts': a token id is out of range [0, {self.k})")
        for label, token, count in zip(columns["label"], columns["token"], columns["count"], strict=True):
            self._hist(label)[token] += count

    def columns(self) -> dict[str, list[int]]:
        """The counts as a shard index stores them (found in one pass over the stacked histograms, not per entry:
        a shard holds ~10^4 nonzero entries)."""
        labels = sorted(self.by_label)
        hist = np.stack([self.by_label[lab] for lab in labels]) if labels else np.zeros((0, self.k), np.int64)
        row, token = np.nonzero(hist)  # row-major: labels ascending, then token ids ascending
        return {"label": np.array(labels, np.int64)[row].tolist(), "token": token.tolist(),
                "count": hist[row, token].tolist()}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TokenCounts) and self.by_label.keys() == other.by_label.keys()
                and all(np.array_equal(h, other.by_label[lab]) for lab, h in self.by_label.items()))


def _stats_of(data: bytes, where: str) -> dict:
    """The shard stats stored in an index's schema metadata, checked for the fields readers use."""
    try:
        meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
    except (pa.ArrowException, ValueError, OSError) as e:
        raise ManifestError(f"{where}: not a Parquet shard index ({e})") from None
    if _META_KEY not in meta:
        raise ManifestError(f"{where}: not a kmim shard index (no {_META_KEY.decode()} metadata)")
    try:
        stats = json.loads(meta[_META_KEY])
    except ValueError as e:
        raise ManifestError(f"{where}: shard stats are not valid JSON ({e})") from None
    tc = stats.get("token_counts") if isinstance(stats, dict) else None
    columns = [tc.get(c) for c in ("label", "token", "count")] if isinstance(tc, dict) else []
    if not (len(columns) == 3 and all(isinstance(c, list) for c in columns)
            and len({len(c) for c in columns}) == 1
            and all(isinstance(v, int) and not isinstance(v, bool) for c in columns for v in c)
            and all(t >= 0 for t in columns[1]) and all(n >= 0 for n in columns[2])):
        raise ManifestError(f"{where}: field 'token_counts' is not three equal-length integer columns")
    for count in ("samples", "inputs", "bytes"):
        if not _is_count(stats.get(count)):
            raise ManifestError(f"{where}: field '{count}': {stats.get(count)!r} is not a count")
    if not isinstance(stats.get("skipped"), dict):
        raise ManifestError(f"{where}: field 'skipped' is not a mapping")
    return stats


def read_index_stats(path: str | Path, fs: AbstractFileSystem | None = None) -> dict:
    fs = fs or LocalFileSystem()
    return _stats_of(fs.cat_file(str(path)), url_of(fs, str(path)))


def read_index(path: str | Path, fs: AbstractFileSystem | None = None) -> pa.Table:
    fs = fs or LocalFileSystem()
    try:
        return pq.read_table(io.BytesIO(fs.cat_file(str(path))), schema=INDEX_SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise ManifestError(f"{url_of(fs, str(path))}: not a kmim shard index ({e})") from None


def index_stats(out: str | Path, shards: list[str],
                fs: AbstractFileSystem | None = None) -> dict[str, dict | Exception]:
    """``{shard name: its index stats, or the error reading them}`` of ``shards`` in ``out``; the indexes are read
    with one ``fs.cat``, concurrent on remote filesystems."""
    fs = fs or LocalFileSystem()
    paths = {name: join(str(out), index_name(name)) for name in shards}
    blobs = fs.cat(list(paths.values()), on_error="return") if paths else {}
    by_path = {fs_path(fs, p): data for p, data in blobs.items()}
    found: dict[str, dict | Exception] = {}
    for name, path in paths.items():
        data = by_path[fs_path(fs, path)]
        if not isinstance(data, Exception):
            try:
                data = _stats_of(data, url_of(fs, path))
            except ValueError as e:
                data = e
        found[name] = data
    return found


def dataset_counts(root: str | Path, manifest: dict, fs: AbstractFileSystem | None = None) -> TokenCounts:
    """The token-by-label histograms of every shard index the (checked) ``manifest`` of the dataset at ``root``
    lists, the indexes read as :func:`index_stats` reads them; :class:`ManifestError` naming the first index that
    cannot be read."""
    fs = fs or LocalFileSystem()
    counts = TokenCounts(manifest["codebook"]["k"])
    found = index_stats(root, [e["path"] for e in manifest["shards"]], fs)
    for entry in manifest["shards"]:
        where, stats = url_of(fs, join(str(root), entry["index"])), found[entry["path"]]
        if isinstance(stats, Exception):
            raise ManifestError(f"{where}: {stats}")
        counts.add_columns(stats["token_counts"], where)
    return counts


def build_manifest(out: str | Path, shards: list[str], *, dataset: dict, fs: AbstractFileSystem | None = None,
                   known: dict[str, dict] | None = None) -> dict:
    """Assemble the manifest from finished shards' index stats plus dataset-level fields.

    ``dataset`` carries ``tokenizer_id``, ``codebook``, ``token_grid``, ``preprocess``, ``labels``,
    ``source``. Shard paths are relative to ``out``; nothing in the manifest depends on where or when
    the job ran, so an interrupted-and-resumed job commits the same manifest as an uninterrupted one.
    ``known`` holds stats the caller already has (read or just written this run); only the others are read.
    """
    fs = fs or LocalFileSystem()
    known = known or {}
    found = {**index_stats(out, [s for s in shards if s not in known], fs), **known}
    entries, skipped, samples, inputs = [], Counter(), 0, 0
    for name in shards:
        stats = found[name]
        if isinstance(stats, Exception):
            raise stats
        if stats.get("tokenizer_id") != dataset["tokenizer_id"]:
            raise ManifestError(f"{url_of(fs, join(str(out), index_name(name)))}: {name} was tokenized with "
                                f"tokenizer_id {stats.get('tokenizer_id')!r}, not the dataset's "
                                f"{dataset['tokenizer_id']!r}; refusing to commit it")
        entries.append({"path": name, "index": index_name(name), "samples": stats["samples"],
                        "bytes": stats["bytes"], "sha256": stats["sha256"], "inputs": stats["inputs"]})
        skipped.update(stats["skipped"])
        samples += stats["samples"]
        inputs += stats["inputs"]
    return {"format": FORMAT, "kmim_version": __version__, "samples": samples, "inputs": inputs,
            "skipped": dict(sorted(skipped.items())), **dataset, "shards": entries}


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def write_manifest(out: str | Path, manifest: dict, fs: AbstractFileSystem | None = None) -> None:
    """Commit the dataset: store ``manifest.json`` all-or-nothing and checked."""
    put_bytes(fs or LocalFileSystem(), join(str(out), MANIFEST), manifest_bytes(manifest))


def read_manifest(root: str | Path, fs: AbstractFileSystem | None = None) -> dict:
    """Load ``manifest.json`` from a dataset directory; raises :class:`ManifestError` unless
    :func:`check_manifest` passes, so no caller ever opens a path the manifest names without validation."""
    fs = fs or LocalFileSystem()
    path = join(str(root), MANIFEST)
    where = url_of(fs, path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no manifest (the dataset is missing or was never committed)") from None
    return parse_manifest(data, where)


def parse_manifest(data: bytes, where: str) -> dict:
    """The manifest in ``data`` once :func:`check_manifest` passes; :class:`ManifestError` naming ``where``
    otherwise (invalid JSON included)."""
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise ManifestError(f"{where}: not valid JSON ({e})") from None
    return check_manifest(manifest, where)
