"""The two stages, each a frozen callable over one input shard built with only the settings it uses: sample fit
features (:class:`FitSampleStage`), and tokenize (:class:`TokenizeStage`).

Both run unchanged in-process or as Ray tasks. Each image is decoded once per stage and its views rendered with
:func:`kmim.datasets.preprocess.decode_views`, whose renderer the training loader uses too; within
:func:`kmim.pipeline.decoding.keep_decoded`, once per job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from fsspec import AbstractFileSystem

from kmim.datasets.codebook import Codebook, load_codebook_at
from kmim.datasets.manifest import TokenCounts, index_name, shard_name, write_index
from kmim.datasets.preprocess import Views
from kmim.datasets.shards import ShardWriter, encode_npy
from kmim.pipeline.decoding import DecodeSpec, decoded, decoded_once, keep, sample_key
from kmim.pipeline.sources import InputShard, RawSample, recorded_name
from kmim.storage import is_local, join, open_url, put_verified, staging_dir
from kmim.tokenizers.assign import nearest
from kmim.tokenizers.extractors import Extractor, ExtractorSpec, PixelSpec, build_extractor

log = logging.getLogger("kmim")
# Features searched at once by the tokenize stage (rows): the extraction batches' features are gathered up to this.
SEARCH_ROWS = 16384


def json_digest(obj) -> str:
    """24-hex-digit sha256 of ``obj`` as canonical JSON: a stable name for a set of settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class OutputSpec:
    """Where the tokenize stage writes: ``url`` (a directory or fsspec URL), its filesystem's ``storage_options``
    (may hold credentials: never shown), and ``staging``, the local directory a remote output's shards are
    written in before upload (None: the default, see :func:`kmim.storage.staging_dir`)."""

    url: str
    storage_options: dict = field(repr=False)
    staging: str | None


def token_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint16) if k <= 65536 else np.dtype(np.int32)


def _batch_tensor(views: list[Views]) -> torch.Tensor:
    """uint8 [B * V, 3, N, N] from each image's V views rendered for the extractor, [V, N, N, 3] each."""
    return torch.from_numpy(np.concatenate([v.extract for v in views])).permute(0, 3, 1, 2)


def on_halves(fn: Callable[[list[Views]], torch.Tensor], views: list[Views]) -> torch.Tensor:
    """``fn(views)``; a batch that runs the device out of memory is split in halves (recursively, down to one
    image) and the halves' results concatenated along dim 0, instead of failing the shard on every retry."""
    try:
        return fn(views)
    except torch.cuda.OutOfMemoryError:
        if len(views) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of device memory on a batch of %d images; running it in halves", len(views))
        half = len(views) // 2
        return torch.cat([on_halves(fn, views[:half]), on_halves(fn, views[half:])])


@dataclass(frozen=True)
class FitSampleStage:
    """Stage: the k-means fit features of one input shard, float32 [n, D].

    From each of the shard's first ``images`` decodable images, ``patches`` patches are drawn without
    replacement from the patches of all its views by a generator seeded with (``seed``, sample key), so the fit
    sample does not depend on the runner or on ``batch_size`` (images per extraction batch).
    """

    decode: DecodeSpec
    extractor: ExtractorSpec
    batch_size: int
    seed: int
    images: int
    patches: int

    def __call__(self, shard: InputShard) -> np.ndarray:
        extractor = build_extractor(self.extractor)
        views, keys, seen = [], [], []
        for item in decoded(shard, self.decode):
            seen.append(item)
            raw, view, _ = item
            if view is not None:
                views.append(view)
                keys.append(sample_key(raw.source))
                if len(views) == self.images:
                    break
        keep(shard, self.decode, seen)
        sample = self._pixel_patches if isinstance(self.extractor, PixelSpec) else self._features
        out = [sample(extractor, views[i:i + self.batch_size], keys[i:i + self.batch_size])
               for i in range(0, len(views), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)

    def _drawn(self, key: str, total: int) -> np.ndarray:
        """Indices of the patches drawn from the ``total`` patches of the views of the image with hex ``key``: all,
        in order, when ``patches`` >= ``total``."""
        if self.patches >= total:
            return np.arange(total)
        rng = np.random.default_rng([self.seed, int(key, 16)])
        return rng.choice(total, size=self.patches, replace=False)

    def _features(self, extractor: Extractor, views: list[Views], keys: list[str]) -> np.ndarray:
        """float32 [n, D]: the drawn patches' features of a batch of images, extracted from their whole views."""
        with torch.inference_mode():
            feats = on_halves(lambda batch: extractor(_batch_tensor(batch)).cpu(), views)
        feats = feats.reshape(len(views), -1, feats.shape[-1]).float().numpy()
        return np.concatenate([f[self._drawn(key, f.shape[0])] for f, key in zip(feats, keys, strict=True)])

    def _pixel_patches(self, extractor: Extractor, views: list[Views], keys: list[str]) -> np.ndarray:
        """:meth:`_features` for the pixel extractor, whose feature of a patch is a function of that patch's pixels
        alone: only the drawn patches are cut out and extracted, each as an image of one patch (the same values,
        a tenth of the work at 20 of 196 patches)."""
        p = self.extractor.patch_size
        stacked = np.stack([v.extract for v in views])  # [B, V, N, N, 3]
        b, v, n = stacked.shape[:3]
        patches = stacked.reshape(b, v, n // p, p, n // p, p, 3).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, -1, p, p, 3)
        if self.patches < patches.shape[1]:
            drawn = np.stack([self._drawn(key, patches.shape[1]) for key in keys])  # [B, drawn per image]
            patches = np.take_along_axis(patches, drawn[:, :, None, None, None], 1)
        cut = patches.reshape(-1, p, p, 3)
        with torch.inference_mode():
            feats = extractor(torch.from_numpy(cut).permute(0, 3, 1, 2))
        return feats.reshape(-1, feats.shape[-1]).float().numpy()


@lru_cache(maxsize=2)
def _cached_codebook(fs: AbstractFileSystem, path: str, stamp: int) -> Codebook:
    """The codebook at ``path``, loaded once per process and version (``stamp``: a checksum of its file info)."""
    return load_codebook_at(fs, path)


def _codebook(url: str, storage_options: dict) -> Codebook:
    fs, path = open_url(url, storage_options)
    fs.invalidate_cache(path)
    return _cached_codebook(fs, path, fs.checksum(path))


class _Assigner:
    """Token grids of views: extract a batch (on the extractor's device: a GPU actor's GPU), then the exact
    nearest-centroid search of one or more batches' features on their device, accumulating the seconds of each
    phase in ``timing``."""

    def __init__(self, extractor: ExtractorSpec, method: str, book: Codebook, codebook_path: str,
                 timing: dict[str, float]) -> None:
        self.extractor, self.book, self.method, self.timing = build_extractor(extractor), book, method, timing
        differs = sorted(k for k, v in self.extractor.metadata().items() if book.metadata.get(k) != v)
        if differs:  # e.g. a weights file replaced between the fit and a resumed run
            raise ValueError(f"{codebook_path}: the extractor differs from the one the codebook was fitted with "
                             f"in {', '.join(differs)}; tokens would not match the codebook")
        self.centroids = {book.centroids.device: book.centroids}  # copied once to each device used
        self.dtype = token_dtype(book.k)

    def _extract(self, views: list[Views]) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.inference_mode():
            feats = self.extractor(_batch_tensor(views))
        if feats.is_cuda:
            torch.cuda.synchronize(feats.device)  # so the phases' times are the GPU's
        self.timing["extract"] += time.perf_counter() - t0
        return feats

    def extract(self, views: list[Views]) -> torch.Tensor:
        """Features [B * V, h, w, D] of a batch of images' views; a batch out of device memory runs in halves."""
        return on_halves(self._extract, views)

    def assign(self, feats: list[torch.Tensor]) -> np.ndarray:
        """Token grids [sum_i B_i * V, h, w] in the dataset's token dtype of the views whose features
        [B_i * V, h, w, D] (:meth:`extract`) are ``feats``, searched at once (a faiss search of 16k rows on 2
        threads took 0.30 s per 298k CIFAR patches, of 4k rows 0.42 s)."""
        t0 = time.perf_counter()
        x = torch.cat(feats) if len(feats) > 1 else feats[0]
        _, h, w, d = x.shape
        if x.device not in self.centroids:
            self.centroids[x.device] = self.book.centroids.to(x.device)
        tokens, _ = nearest(x.reshape(-1, d), self.centroids[x.device], metric=self.extractor.metric,
                            method=self.method, threads=torch.get_num_threads())
        self.timing["assign"] += time.perf_counter() - t0
        return tokens.reshape(x.shape[0], h, w).cpu().numpy().astype(self.dtype)


class _ShardRecord:
    """What a shard's index records: one row per input (``ok`` or the skip reason), skip counts, token counts."""

    def __init__(self, k: int) -> None:
        self.rows: list[dict] = []
        self.skipped: dict[str, int] = {}
        self.counts = TokenCounts(k)

    def add_input(self, raw: RawSample, views: Views | None, reason: str | None) -> None:
        size = views.source_size if views is not None else [None, None]
        self.rows.append({"key": sample_key(raw.source), "source": recorded_name(raw.source), "label": raw.label,
                          "status": reason or "ok", "width": size[0], "height": size[1]})
        if reason is not None:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def stats(self, samples: int, sha256: str, nbytes: int, tokenizer_id: str) -> dict:
        return {"samples": samples, "inputs": len(self.rows), "bytes": nbytes, "sha256": sha256,
                "skipped": self.skipped, "tokenizer_id": tokenizer_id, "token_counts": self.counts.columns()}


_SAMPLE_JSON = json.JSONEncoder(sort_keys=True)  # json.dumps(meta, sort_keys=True), without an encoder per call


def _count_tokens(counts: TokenCounts, grids: np.ndarray, labels: list[int | None]) -> None:
    """Add a batch's token grids [B, V, h, w] to ``counts``: one histogram update per label (None = -1) in it."""
    by_sample = np.array([-1 if label is None else label for label in labels], np.int64)
    for label in sorted(set(by_sample.tolist())):  # not np.unique: it imports numpy.ma (30-60 ms) in every worker
        counts.add_grid(grids[by_sample == label], label)


def _write_samples(writer: ShardWriter, batch: list[tuple[RawSample, Views]], grids: np.ndarray,
                   counts: TokenCounts) -> None:
    """Each sample as its stored image, ``.tokens.npy`` and ``.json`` (key, source, label, view geometry): with one
    view the grid [h, w] and its geometry; with V > 1 the grids [V, h, w] and the list of V geometries."""
    _count_tokens(counts, grids, [raw.label for raw, _ in batch])
    for (raw, views), grid in zip(batch, grids, strict=True):
        key = sample_key(raw.source)
        one = len(views.geometry) == 1
        meta = {"key": key, "source": recorded_name(raw.source), "label": raw.label,
                "view": views.geometry[0] if one else views.geometry}
        writer.write({"__key__": key, views.ext: views.data, "tokens.npy": encode_npy(grid[0] if one else grid),
                      "json": _SAMPLE_JSON.encode(meta).encode()})


def _finish_shard(writer: ShardWriter, record: _ShardRecord, tokenizer_id: str) -> dict:
    """End the shard's tar (hashed while written), write its index beside it, then commit the tar (a finished
    shard always has its index); return the shard stats the index stores."""
    sha, nbytes = writer.finish()
    stats = record.stats(writer.samples, sha, nbytes, tokenizer_id)
    write_index(writer.final.with_name(index_name(writer.final.name)), record.rows, stats)
    writer.commit()
    return stats


def upload_shard(out: Path, name: str, fs: AbstractFileSystem, root: str, sha256: str, nbytes: int) -> float:
    """Upload a finished local shard and its index to ``root`` on ``fs``, the index first (a shard whose tar is
    there always has its index), each checked; the local files are removed. Returns the seconds taken."""
    t = time.perf_counter()
    try:
        put_verified(out / index_name(name), fs, join(root, index_name(name)))
        put_verified(out / name, fs, join(root, name), sha256=sha256, size=nbytes)
    finally:
        (out / index_name(name)).unlink(missing_ok=True)
        (out / name).unlink(missing_ok=True)
    return time.perf_counter() - t


@dataclass(frozen=True)
class TokenizeStage:
    """Stage: tokenize one input shard into ``shard-XXXXX.tar`` (+ its index) in ``output``, atomically.

    ``codebook`` is the codebook's path or fsspec URL, read with the output's storage options. Views are
    extracted ``batch_size`` images (all their views) at a time, and assigned (nearest-centroid search ``assign``,
    on this process's torch threads) :data:`SEARCH_ROWS` features or the shard's rest at a time. A remote shard is
    written to the local staging directory, then its index and its tar are uploaded, in that order, each checked
    before it counts. Returns the shard stats (also stored in the index) plus
    ``timing``: seconds per phase.
    """

    decode: DecodeSpec
    extractor: ExtractorSpec
    batch_size: int
    assign: str
    codebook: str
    output: OutputSpec

    def __call__(self, shard: InputShard) -> dict:
        book = _codebook(self.codebook, self.output.storage_options)
        timing = {"decode": 0.0, "extract": 0.0, "assign": 0.0, "write": 0.0}
        assigner = _Assigner(self.extractor, self.assign, book, self.codebook, timing)
        fs, root = open_url(self.output.url, self.output.storage_options)
        out = Path(root) if is_local(fs) else staging_dir(self.output.url, self.output.staging)
        out.mkdir(parents=True, exist_ok=True)
        name = shard_name(shard.index)
        record = _ShardRecord(book.k)
        pending: list[tuple[RawSample, Views]] = []  # decoded, not yet extracted
        ready: list[tuple[RawSample, Views]] = []  # extracted (features in feats), not yet assigned
        feats: list[torch.Tensor] = []

        def extract() -> None:
            feats.append(assigner.extract([v for _, v in pending]))
            ready.extend(pending)
            pending.clear()

        def assign_and_write() -> None:
            grids = assigner.assign(feats)
            t = time.perf_counter()
            _write_samples(writer, ready, grids.reshape(len(ready), -1, *grids.shape[1:]), record.counts)
            timing["write"] += time.perf_counter() - t
            ready.clear()
            feats.clear()

        with ShardWriter(out / name) as writer:  # an exception discards the shard (its temporary file)
            t = time.perf_counter()
            for raw, view, reason in decoded_once(shard, self.decode):
                timing["decode"] += time.perf_counter() - t
                record.add_input(raw, view, reason)
                if reason is None:
                    pending.append((raw, view))
                    if len(pending) == self.batch_size:
                        extract()
                        if sum(f.shape[0] * f.shape[1] * f.shape[2] for f in feats) >= SEARCH_ROWS:
                            assign_and_write()
                t = time.perf_counter()
            if pending:
                extract()
            if ready:
                assign_and_write()
            t = time.perf_counter()
            stats = _finish_shard(writer, record, book.tokenizer_id)
            timing["write"] += time.perf_counter() - t
        if not is_local(fs):
            timing["upload"] = upload_shard(out, name, fs, root, stats["sha256"], stats["bytes"])
        return {**stats, "shard": name, "timing": timing}
