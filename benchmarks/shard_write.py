"""Shard writing alone, on the CIFAR job's samples: the tokenize stage's write step before and after issue 14.

Every CIFAR-subset image (32 x 32, stored as PNG, or re-encoded as JPEG quality 90 with ``--formats jpeg``) is
decoded once beforehand, as the tokenize stage does, and given a random K=1024 token grid [8, 8] (image 32,
patch 4); the timed part turns them into 500-sample shards (the job's shard size) written in batches of 256:
token counts, ``.tokens.npy``, ``.json``, tar, sha256, Parquet index, rename. Writers:

- ``baseline``: the write step as it was, re-implemented here: webdataset's ``TarWriter`` way (a ``TarInfo`` per
  member, ``tarfile`` in stream mode, float mtime) into a default-buffered file hashed write by write (tarfile
  writes 10 KiB records), ``np.save`` and ``json.dumps`` per sample, a token histogram per sample, the index's
  token counts gathered entry by entry;
- ``kmim``: the tokenize stage's own functions (``_ShardRecord``, ``_write_samples``, ``_finish_shard``).

Both must write the same tar bytes and index stats (checked). Prints samples/s and MB/s of tar per writer (median
of the rounds), then the ratio, with the machine line and the load average.

    .venv/bin/python benchmarks/shard_write.py [--formats png,jpeg] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import CIFAR, emit, machine
from PIL import Image

from kmim.datasets.manifest import INDEX_SCHEMA, TokenCounts, index_name, read_index_stats, shard_name
from kmim.datasets.preprocess import Preprocess, Views, ViewSpec, decode_views
from kmim.datasets.shards import ShardWriter
from kmim.files import atomic_write, tmp_path
from kmim.pipeline.decoding import sample_key
from kmim.pipeline.sources import RawSample
from kmim.pipeline.stages import _finish_shard, _ShardRecord, _write_samples

K, GRID, SHARD_SIZE, BATCH = 1024, 8, 500, 256
Sample = tuple[RawSample, Views]
Shard = tuple[list[Sample], np.ndarray]  # a shard's samples and their token grids uint16 [n, 1, 8, 8]
Writer = Callable[[Path, list[Sample], np.ndarray], str]  # writes one shard, returns its sha256


def cifar_samples(fmt: str) -> list[Sample]:
    """Every CIFAR-subset image as the tokenize stage holds it before writing: its input and its decoded view."""
    if not CIFAR.is_dir():
        raise SystemExit(f"CIFAR subset not found at {CIFAR} (set KMIM_CIFAR)")
    classes = sorted(p.name for p in CIFAR.iterdir() if p.is_dir())
    samples = []
    for label, cls in enumerate(classes):
        for path in sorted((CIFAR / cls).iterdir()):
            data = path.read_bytes() if fmt == "png" else _jpeg(path)
            raw = RawSample(f"{cls}/{path.stem}.{fmt}", data, label)
            samples.append((raw, decode_views(data, Preprocess(32), ViewSpec(), sample_key(raw.source), 32)))
    return samples


def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def shards(samples: list[Sample], grids: np.ndarray) -> list[Shard]:
    return [(samples[i:i + SHARD_SIZE], grids[i:i + SHARD_SIZE]) for i in range(0, len(samples), SHARD_SIZE)]


def write_kmim(path: Path, samples: list[Sample], grids: np.ndarray) -> str:
    """One shard through the tokenize stage's write step; its sha256."""
    record = _ShardRecord(K)
    with ShardWriter(path) as writer:
        for raw, views in samples:
            record.add_input(raw, views, None)
        for i in range(0, len(samples), BATCH):
            _write_samples(writer, samples[i:i + BATCH], grids[i:i + BATCH], record.counts)
        return _finish_shard(writer, record, "bench")["sha256"]


class _HashingFile:
    """The baseline's output file: each write goes to a default-buffered file and into sha256."""

    def __init__(self, path: Path):
        self.file, self.hash, self.size = open(path, "wb"), hashlib.sha256(), 0  # noqa: SIM115 - closed by caller

    def write(self, data: bytes) -> int:
        n = self.file.write(data)
        self.hash.update(data)
        self.size += n
        return n


def _baseline_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member as webdataset's ``TarWriter.write`` added it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0.0, 0o444, "kmim", "kmim"
    tar.addfile(info, io.BytesIO(data))


def _baseline_sample(tar: tarfile.TarFile, raw: RawSample, views: Views, grid: np.ndarray,
                     counts: TokenCounts) -> None:
    key = sample_key(raw.source)
    counts.add_grid(grid, raw.label)
    npy = io.BytesIO()
    np.save(npy, grid[0], allow_pickle=False)
    meta = {"key": key, "source": raw.source, "label": raw.label, "view": views.geometry[0]}
    sample = {views.ext: views.data, "tokens.npy": npy.getvalue(), "json": json.dumps(meta, sort_keys=True).encode()}
    for ext in sorted(sample):
        _baseline_member(tar, f"{key}.{ext}", sample[ext])


def _baseline_columns(counts: TokenCounts) -> dict[str, list[int]]:
    """``TokenCounts.columns`` as it was: one Python tuple per nonzero (label, token) entry."""
    nz = [(lab, int(tok), int(counts.by_label[lab][tok]))
          for lab in sorted(counts.by_label) for tok in np.flatnonzero(counts.by_label[lab])]
    return {"label": [r[0] for r in nz], "token": [r[1] for r in nz], "count": [r[2] for r in nz]}


def write_baseline(path: Path, samples: list[Sample], grids: np.ndarray) -> str:
    """One shard the way the write step did it before issue 14; its sha256."""
    rows = [{"key": sample_key(raw.source), "source": raw.source, "label": raw.label, "status": "ok",
             "width": views.source_size[0], "height": views.source_size[1]} for raw, views in samples]
    counts, tmp = TokenCounts(K), tmp_path(path)
    out = _HashingFile(tmp)
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for (raw, views), grid in zip(samples, grids, strict=True):
            _baseline_sample(tar, raw, views, grid, counts)
    out.file.close()
    stats = {"samples": len(samples), "inputs": len(rows), "bytes": out.size, "sha256": out.hash.hexdigest(),
             "skipped": {}, "tokenizer_id": "bench", "token_counts": _baseline_columns(counts)}
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    table = table.replace_schema_metadata({b"kmim.shard": json.dumps(stats, sort_keys=True).encode()})
    atomic_write(path.with_name(index_name(path.name)), lambda t: pq.write_table(table, t))
    os.replace(tmp, path)
    return stats["sha256"]


def _index_stats(work: Path, parts: list[Shard]) -> list[dict]:
    return [read_index_stats(work / index_name(shard_name(i))) for i in range(len(parts))]


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages: other work on the machine skews the figures."""
    return [round(x, 2) for x in os.getloadavg()]


def time_writer(write: Writer, work: Path, parts: list[Shard]) -> tuple[float, list[str], int]:
    """(seconds, shard sha256s, tar bytes) of writing every shard with ``write`` into a fresh ``work``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    digests = [write(work / shard_name(i), samples, grids) for i, (samples, grids) in enumerate(parts)]
    seconds = time.perf_counter() - t
    return seconds, digests, sum(p.stat().st_size for p in work.glob("*.tar"))


def bench(fmt: str, rounds: int, work: Path) -> None:
    samples = cifar_samples(fmt)
    grids = np.random.default_rng(0).integers(0, K, (len(samples), 1, GRID, GRID)).astype(np.uint16)
    parts = shards(samples, grids)
    writers = {"baseline": write_baseline, "kmim": write_kmim}
    seconds: dict[str, list[float]] = {name: [] for name in writers}
    for _ in range(rounds):  # interleaved, so both see the same machine load
        found = {name: time_writer(write, work / name, parts) for name, write in writers.items()}
        if found["baseline"][1] != found["kmim"][1]:
            raise SystemExit("the writers wrote different shards")
        for name, (s, _, _) in found.items():
            seconds[name].append(s)
    if _index_stats(work / "baseline", parts) != _index_stats(work / "kmim", parts):
        raise SystemExit("the writers wrote different index stats")
    nbytes = found["kmim"][2]
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in median.items():
        emit(bench="shard_write", writer=name, format=fmt, samples=len(samples), shards=len(parts),
             seconds=round(s, 4), samples_per_s=round(len(samples) / s), mb_per_s=round(nbytes / s / 1e6, 1),
             bytes_per_sample=round(nbytes / len(samples)), rounds=rounds, load=load(), machine=machine())
    emit(bench="shard_write", format=fmt, ratio=round(median["baseline"] / median["kmim"], 2), load=load(),
         machine=machine())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="png,jpeg")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kmim-shard-write-"))
    try:
        for fmt in args.formats.split(","):
            bench(fmt, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
