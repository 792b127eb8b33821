"""Input sources: plan a dataset into input shards, then read one input shard as raw samples.

Kinds: an ImageFolder tree (label = class folder, chunked by ``shard_size``), WebDataset tars (one
input shard per tar; a path, directory, brace pattern or fsspec URL), Parquet files (row ranges of
``shard_size``), and the built-in sample (scikit-learn's digits, upscaled to 64 px PNG).
Planning only lists and stats files; reading happens in the stage that owns the shard.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
from braceexpand import braceexpand
from PIL import Image

from kmim.datasets.preprocess import IMAGE_EXTS, NO_IMAGE
from kmim.datasets.shards import iter_tar

BUILTIN = "builtin:digits"


class InputError(ValueError):
    """The input cannot be planned; the message names the path or field."""


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


def _plan_folder(fs, root: str, shard_size: int) -> tuple[list[InputShard], list[str] | None]:
    entries = fs.find(root, withdirs=False)
    rel = sorted(posixpath.relpath(p, root) for p in entries if _is_image(p))
    if not rel:
        raise InputError(f"input {root!r}: no image files ({', '.join(IMAGE_EXTS)}) found")
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    label_of = {c: i for i, c in enumerate(classes)}
    files = [(r, label_of[r.split("/", 1)[0]] if "/" in r else None) for r in rel]
    location = _url(fs, root)
    shards = [InputShard(i, "folder", location, tuple(files[a:b]), a, b)
              for i, (a, b) in enumerate(_chunks(len(files), shard_size))]
    return shards, classes or None


def _plan_parquet(fs, paths: list[str], cfg) -> list[InputShard]:
    shards: list[InputShard] = []
    for path in paths:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
            f.seek(0)
            rows = pq.ParquetFile(f).metadata.num_rows
        if cfg.image_column not in schema.names:
            raise InputError(f"{path}: field 'image_column': column {cfg.image_column!r} not found "
                             f"(columns: {', '.join(schema.names)})")
        shards.extend(InputShard(len(shards), "parquet", _url(fs, path), (), a, b)
                      for a, b in _chunks(rows, cfg.shard_size))
    return shards


def _builtin_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def plan_inputs(cfg) -> tuple[list[InputShard], list[str] | None]:
    """Split the configured input into ordered shards; returns (shards, class names or None)."""
    if cfg.input is None:
        n = len(_builtin_images()[1])
        shards = [InputShard(i, "builtin", BUILTIN, (), a, b) for i, (a, b) in enumerate(_chunks(n, cfg.shard_size))]
        return shards, [str(d) for d in range(10)]
    fs, paths = _expand(cfg.input)
    if not paths or not all(fs.exists(p) for p in paths):
        missing = next((p for p in paths if not fs.exists(p)), cfg.input)
        raise InputError(f"field 'input': {missing!r} does not exist")
    if len(paths) == 1 and fs.isdir(paths[0]):
        root = paths[0]
        listing = sorted(fs.find(root, withdirs=False))
        tars = [p for p in listing if p.endswith(".tar")]
        parquets = [p for p in listing if p.endswith(".parquet")]
        if tars and not parquets:
            paths = tars
        elif parquets and not tars:
            paths = parquets
        else:
            return _plan_folder(fs, root, cfg.shard_size)
    if all(p.endswith(".tar") for p in paths):
        return [InputShard(i, "tar", _url(fs, p)) for i, p in enumerate(paths)], None
    if all(p.endswith(".parquet") for p in paths):
        return _plan_parquet(fs, paths, cfg), None
    raise InputError(f"field 'input': {cfg.input!r} is not an image folder, .tar shards or .parquet files")


def _read_folder(shard: InputShard) -> Iterator[RawSample]:
    fs, root = fsspec.core.url_to_fs(shard.location)
    for rel, label in shard.files:
        with fs.open(posixpath.join(root, rel), "rb") as f:
            yield RawSample(rel, f.read(), label)


def _tar_label(sample: dict) -> int | None:
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and isinstance(meta.get("label"), int):
            return meta["label"]
    return None


def _read_tar(shard: InputShard) -> Iterator[RawSample]:
    name = posixpath.basename(shard.location)
    with fsspec.open(shard.location, "rb") as f:
        for sample in iter_tar(f, shard.location):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            source = f"{name}/{sample['__key__']}"
            if ext is None:
                yield RawSample(source, None, None, NO_IMAGE)
            else:
                yield RawSample(source, sample[ext], _tar_label(sample))


def _read_parquet(shard: InputShard, cfg) -> Iterator[RawSample]:
    name = posixpath.basename(shard.location)
    with fsspec.open(shard.location, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [cfg.image_column]
        if cfg.label_column and cfg.label_column in pf.schema_arrow.names:
            columns.append(cfg.label_column)
        # Read only the row groups overlapping [start, stop).
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < shard.stop and offset + n > shard.start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=columns).slice(shard.start - first, shard.stop - shard.start)
    images = table.column(cfg.image_column).to_pylist()
    labels = table.column(cfg.label_column).to_pylist() if len(columns) > 1 else [None] * len(images)
    for row, (img, label) in enumerate(zip(images, labels, strict=True), start=shard.start):
        data = img.get("bytes") if isinstance(img, dict) else img
        if label is not None and not isinstance(label, int):
            raise InputError(f"{shard.location} row {row}: field 'label_column': label {label!r} is not an integer")
        yield RawSample(f"{name}#{row}", data, label)


def _read_builtin(shard: InputShard) -> Iterator[RawSample]:
    images, targets = _builtin_images()
    for i in range(shard.start, shard.stop):
        pixels = np.rint(images[i] * (255.0 / 16.0)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").resize((64, 64), Image.Resampling.BILINEAR).save(buf, "PNG")
        yield RawSample(f"sklearn-digits/{i:04d}.png", buf.getvalue(), int(targets[i]))


def read_shard(shard: InputShard, cfg) -> Iterator[RawSample]:
    """Yield the raw samples of one input shard, in a fixed order."""
    if shard.kind == "folder":
        return _read_folder(shard)
    if shard.kind == "tar":
        return _read_tar(shard)
    if shard.kind == "parquet":
        return _read_parquet(shard, cfg)
    return _read_builtin(shard)
