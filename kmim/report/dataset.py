"""What a report reads of a dataset: the checked manifest, its codebook, the token counts its shard indexes hold,
the fit report when the output has one, and a bounded scan of its samples rendered exactly as the trainer renders
them.

Only files the manifest lists are read (shards through :class:`~kmim.datasets.loader.TokenDataset`, which checks
each one's size and sha256 against the manifest), plus the manifest itself and :data:`FIT_REPORT`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from fsspec import AbstractFileSystem

from kmim.datasets.codebook import Codebook, load_codebook_at
from kmim.datasets.loader import TokenDataset, open_manifest
from kmim.datasets.manifest import FIT_REPORT, ManifestError, TokenCounts, dataset_counts
from kmim.datasets.preprocess import Preprocess, SkipImage, render
from kmim.datasets.samples import TokenSpec, decode_sample, view_problem
from kmim.datasets.shard_store import LoaderError
from kmim.datasets.shards import ShardError
from kmim.storage import join, open_url, redact, redact_text, url_of


class ReportError(ValueError):
    """A dataset the report cannot read; the message names the file and the field or sample."""


@dataclass(frozen=True)
class Scanned:
    """One scanned sample: ``pixels`` uint8 [V, S, S, 3] (each stored view as the trainer renders it), ``extract``
    uint8 [V, N, N, 3] (the same views at the extractor's N px; ``pixels`` itself when N == S), ``tokens`` int64
    [V, h, w] (the stored grids), ``label`` (-1 = none)."""

    key: str
    label: int
    pixels: np.ndarray
    extract: np.ndarray
    tokens: np.ndarray


@dataclass
class Dataset:
    """An opened dataset: ``counts`` the token-by-label histograms of every shard index (the whole dataset, not the
    scan), ``fit`` the fit report (None: the output has none, ``fit_note`` says why), ``reader`` None when the
    dataset holds no sample."""

    where: str  # the root, redacted, for messages and the page
    manifest: dict
    book: Codebook
    counts: TokenCounts
    fit: dict | None
    fit_note: str
    reader: TokenDataset | None

    @cached_property
    def spec(self) -> TokenSpec:
        return TokenSpec.of(self.manifest)

    @cached_property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_description(self.manifest["preprocess"])

    @cached_property
    def usage(self) -> np.ndarray:
        """Patches per code over the whole dataset, int64 [K]."""
        return sum(self.counts.by_label.values(), np.zeros(self.book.k, np.int64))

    @cached_property
    def extract_size(self) -> int:
        """N, the pixels per side of the views the extractor saw."""
        return self.book.metadata.get("tokenizer_image_size") or self.preprocess.image_size


def open_dataset(root: str, storage_options: dict | None, cache_dir: Path) -> Dataset:
    """Open the committed dataset at ``root`` (a directory or fsspec URL); raises :class:`ReportError` (or the
    loader's :class:`~kmim.datasets.shard_store.LoaderError`) naming the file at fault. ``cache_dir`` is the shard
    reader's scratch directory."""
    where = redact(os.fspath(root))
    manifest = open_manifest(root, storage_options=storage_options)
    fs, path = open_url(os.fspath(root), storage_options)
    book = _codebook(fs, path, manifest)
    counts = _counts(fs, path, manifest)
    fit, note = _fit_report(fs, path, manifest)
    reader = None
    if manifest["samples"]:
        # Used for its checked shard reads only; cache_bytes 0: a scan reads each shard once, so none is cached.
        reader = TokenDataset(root, batch_size=1, shuffle=False, drop_last=False, cache_dir=cache_dir, cache_bytes=0,
                              storage_options=storage_options)
    return Dataset(where, manifest, book, counts, fit, note, reader)


def _codebook(fs: AbstractFileSystem, root: str, manifest: dict) -> Codebook:
    """The manifest's codebook, checked to be the one its tokens came from."""
    path = join(root, manifest["codebook"]["path"])
    where = redact(url_of(fs, path))
    try:
        book = load_codebook_at(fs, path, where)
    except FileNotFoundError:
        raise ReportError(f"{where}: the codebook the manifest names does not exist") from None
    if book.tokenizer_id != manifest["tokenizer_id"] or book.k != manifest["codebook"]["k"]:
        raise ReportError(f"{where}: tokenizer_id {book.tokenizer_id} / K={book.k} is not the manifest's "
                          f"{manifest['tokenizer_id']} / K={manifest['codebook']['k']} (field 'tokenizer_id')")
    return book


def _counts(fs: AbstractFileSystem, root: str, manifest: dict) -> TokenCounts:
    """The token-by-label histograms of all the manifest's shard indexes."""
    try:
        return dataset_counts(root, manifest, fs)
    except ManifestError as e:
        raise ReportError(redact_text(str(e))) from None


def _fit_report(fs: AbstractFileSystem, root: str, manifest: dict) -> tuple[dict | None, str]:
    """(the fit report, or None, and a sentence on what was found)."""
    path = join(root, FIT_REPORT)
    try:
        report = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None, (f"No {FIT_REPORT} in the dataset: kmim fit writes one; a dataset made by kmim run alone, or "
                      "with --codebook from another directory, has none.")
    except ValueError as e:
        return None, f"{FIT_REPORT} is not valid JSON ({e}): not shown."
    history = report.get("history") if isinstance(report, dict) else None
    if not (isinstance(history, list) and all(isinstance(h, dict) and _number(h.get("epoch"))
                                              and _number(h.get("inertia")) for h in history)):
        return None, f"{FIT_REPORT} has no list 'history' of {{epoch, inertia}} entries: not shown."
    if report.get("tokenizer_id") != manifest["tokenizer_id"]:
        return None, (f"{FIT_REPORT} is the fit of tokenizer_id {report.get('tokenizer_id')!r}, not of this "
                      f"dataset's {manifest['tokenizer_id']}: not shown.")
    return report, f"From {FIT_REPORT}: the mean squared distance of the fit sample to its nearest centroid per epoch."


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def shard_order(counts: list[int], max_images: int) -> list[int]:
    """The order a scan reads shards in: first shards evenly spaced over the manifest's list, as many as hold about
    ``max_images`` samples (so a bounded scan spreads over the dataset), then the others in list order."""
    total = sum(counts)
    wanted = min(len(counts), math.ceil(max_images * len(counts) / total)) if total else 0
    first = [int(i) for i in np.unique(np.linspace(0, len(counts) - 1, wanted).round())] if wanted else []
    chosen = set(first)
    return first + [i for i in range(len(counts)) if i not in chosen]


def scan(data: Dataset, max_images: int) -> Iterator[Scanned]:
    """The first ``max_images`` samples of the shards in :func:`shard_order`, each with every stored view."""
    reader, left = data.reader, max_images
    if reader is None:
        return
    for shard in shard_order(reader.counts, max_images):
        if left <= 0:
            return
        if not reader.counts[shard]:
            continue
        name = reader.shards[shard]
        try:
            samples = reader.read_shard(name)[:left]
        except (LoaderError, ShardError) as e:
            raise ReportError(f"{data.where}: {e}") from None
        for sample in samples:
            yield _scanned(data, sample, f"{data.where}/{name}: sample {sample['__key__']}")
            left -= 1


def _scanned(data: Dataset, sample: dict, where: str) -> Scanned:
    """Decode one raw sample and render its views as :class:`~kmim.datasets.loader.TokenDataset` does."""
    size, n = data.preprocess.image_size, data.extract_size
    try:
        checked, source = decode_sample(sample, data.spec, data.preprocess, where)
        for v, geometry in enumerate(checked.geometry):
            if (problem := view_problem(geometry, v, source, size)) is not None:
                raise ReportError(f"{where}: {problem}")
        pixels = np.stack([render(source.image, g, size) for g in checked.geometry])
        extract = pixels if n == size else np.stack([render(source.image, g, n) for g in checked.geometry])
    except ShardError as e:
        raise ReportError(str(e)) from None
    except SkipImage as e:
        raise ReportError(f"{where}: stored image does not decode ({e})") from None
    tokens = checked.tokens.reshape(-1, *checked.tokens.shape[-2:]).astype(np.int64)
    label = checked.meta.get("label")
    if not (label is None or isinstance(label, int) and not isinstance(label, bool)):
        raise ReportError(f"{where}: .json field 'label' {label!r} is not an integer")
    return Scanned(checked.key, -1 if label is None else label, pixels, extract, tokens)
