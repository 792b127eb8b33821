"""The dataset manifest (the commit) and the per-shard Parquet index beside each shard.

Layout of a dataset directory::

    manifest.json                  written last; a dataset without it does not exist
    codebook.safetensors           the tokenizer the token grids came from
    shard-00000.tar                WebDataset samples: <key>.<img ext>, <key>.tokens.npy, <key>.json
    shard-00000.index.parquet      one row per *input* sample: key, source, label, status, width, height

A shard is finished when its tar exists; the index is renamed into place before the tar, so a finished
shard always has its index. Shard statistics travel in the index's schema metadata, so a manifest can
be rebuilt from finished shards without re-reading the tars.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kmim import __version__
from kmim.datasets.shards import tmp_path

FORMAT = "kmim-dataset/1"
MANIFEST = "manifest.json"
CODEBOOK = "codebook.safetensors"
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


def read_index_stats(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path}: not a kmim shard index (no {_META_KEY.decode()} metadata)")
    return json.loads(meta[_META_KEY])


def read_index(path: Path) -> pa.Table:
    return pq.read_table(path, schema=INDEX_SCHEMA)


def build_manifest(out: Path, shards: list[str], *, dataset: dict) -> dict:
    """Assemble the manifest from finished shards' index stats plus dataset-level fields.

    ``dataset`` carries ``tokenizer_id``, ``codebook``, ``token_grid``, ``preprocess``, ``labels``,
    ``source``. Shard paths are relative to ``out``; nothing in the manifest depends on where or when
    the job ran, so an interrupted-and-resumed job commits the same manifest as an uninterrupted one.
    """
    entries, skipped, samples, inputs = [], Counter(), 0, 0
    for name in shards:
        stats = read_index_stats(out / index_name(name))
        entries.append({"path": name, "index": index_name(name), "samples": stats["samples"],
                        "bytes": stats["bytes"], "sha256": stats["sha256"], "inputs": stats["inputs"]})
        skipped.update(stats["skipped"])
        samples += stats["samples"]
        inputs += stats["inputs"]
    return {"format": FORMAT, "kmim_version": __version__, "samples": samples, "inputs": inputs,
            "skipped": dict(sorted(skipped.items())), **dataset, "shards": entries}


def write_manifest(out: Path, manifest: dict) -> None:
    final = out / MANIFEST
    tmp = tmp_path(final)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, final)


def read_manifest(root: str | Path) -> dict:
    """Load ``manifest.json`` from a dataset directory, checking its format field."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (the dataset is missing or was never committed)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest
