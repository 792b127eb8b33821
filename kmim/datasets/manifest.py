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
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from kmim import __version__
from kmim.datasets.shards import tmp_path
from kmim.storage import join, put_bytes, url_of

FORMAT = "kmim-dataset/1"
MANIFEST = "manifest.json"
CODEBOOK = "codebook.safetensors"
JOB_FILE = "job.json"
_META_KEY = b"kmim.shard"

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
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(stats, sort_keys=True).encode()})
    tmp = tmp_path(final)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _stats_of(data: bytes, where: str) -> dict:
    meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
    if _META_KEY not in meta:
        raise ValueError(f"{where}: not a kmim shard index (no {_META_KEY.decode()} metadata)")
    return json.loads(meta[_META_KEY])


def read_index_stats(path: str | Path, fs: AbstractFileSystem | None = None) -> dict:
    fs = fs or LocalFileSystem()
    return _stats_of(fs.cat_file(str(path)), url_of(fs, str(path)))


def read_index(path: str | Path, fs: AbstractFileSystem | None = None) -> pa.Table:
    fs = fs or LocalFileSystem()
    return pq.read_table(io.BytesIO(fs.cat_file(str(path))), schema=INDEX_SCHEMA)


def build_manifest(out: str | Path, shards: list[str], *, dataset: dict, fs: AbstractFileSystem | None = None) -> dict:
    """Assemble the manifest from finished shards' index stats plus dataset-level fields.

    ``dataset`` carries ``tokenizer_id``, ``codebook``, ``token_grid``, ``preprocess``, ``labels``,
    ``source``. Shard paths are relative to ``out``; nothing in the manifest depends on where or when
    the job ran, so an interrupted-and-resumed job commits the same manifest as an uninterrupted one.
    """
    fs = fs or LocalFileSystem()
    paths = [join(str(out), index_name(name)) for name in shards]
    blobs = fs.cat(paths) if paths else {}  # concurrent on remote filesystems
    by_path = {fs._strip_protocol(p): data for p, data in blobs.items()}
    entries, skipped, samples, inputs = [], Counter(), 0, 0
    for name, path in zip(shards, paths, strict=True):
        stats = _stats_of(by_path[fs._strip_protocol(path)], url_of(fs, path))
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
    """Load ``manifest.json`` from a dataset directory, checking its format field."""
    fs = fs or LocalFileSystem()
    path = join(str(root), MANIFEST)
    where = url_of(fs, path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no manifest (the dataset is missing or was never committed)") from None
    manifest = json.loads(data)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest
