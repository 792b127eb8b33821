"""``kmim report``: one pass over a bounded scan of the dataset, then the page."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmim.files import atomic_write_bytes
from kmim.report.dataset import Dataset, Scanned, open_dataset, scan
from kmim.report.features import Recomputed, distances, recompute
from kmim.report.gallery import Nearest, patches_of, priorities
from kmim.report.page import page
from kmim.report.sections import ASSETS, gallery, numbers, overview, token_maps
from kmim.tokenizers.metrics import counts_report

MAX_IMAGES = 512  # samples scanned by default: bounds the report's time and reads on a dataset of any size
CHUNK = 16  # samples whose features are computed in one batch


@dataclass
class Scan:
    """What the scan kept: the gallery's patches, every scanned sample's key (by scan number), the samples whose
    token maps are shown."""

    nearest: Nearest
    keys: list[str]
    shown: list[Scanned]


def _chunks(items: Iterable[Scanned], n: int) -> Iterator[list[Scanned]]:
    chunk: list[Scanned] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _offer(nearest: Nearest, chunk: list[Scanned], first: int, data: Dataset, features: Recomputed) -> None:
    """Offer every patch of every view of ``chunk`` (scan numbers ``first``...) to ``nearest``, scored by its
    distance to its code's centroid when features can be recomputed, else by its sampling priority."""
    tokens = np.concatenate([s.tokens for s in chunk])  # [B * V, h, w]
    if features.extractor is not None:
        score = distances(features.extractor, data.book.centroids, data.book.metadata["metric"],
                          np.concatenate([s.extract for s in chunk]), tokens)
    else:
        score = np.concatenate([priorities(s.key, s.tokens.shape) for s in chunk])
    views = [len(s.tokens) for s in chunk]
    image = np.repeat(np.arange(first, first + len(chunk)), views)
    view = np.concatenate([np.arange(v) for v in views])
    h, w = tokens.shape[1:]
    ref = np.stack(np.broadcast_arrays(image[:, None, None], view[:, None, None], np.arange(h)[None, :, None],
                                       np.arange(w)[None, None, :]), axis=-1).reshape(-1, 4)
    patches = patches_of(np.concatenate([s.pixels for s in chunk]), h)
    nearest.add(score.reshape(-1), tokens.reshape(-1), ref, patches.reshape(-1, *patches.shape[-3:]))


def _scan(data: Dataset, features: Recomputed, per_code: int, max_images: int, samples: int) -> Scan:
    """Stream the first ``max_images`` samples of :func:`~kmim.report.dataset.scan`, keeping the gallery's patches
    and ``samples`` samples spread over the scan for the token maps."""
    grid = data.spec.shape[-1]
    result = Scan(Nearest(per_code, data.preprocess.image_size // grid), [], [])
    scanned = min(max_images, data.manifest["samples"])
    picks = set(np.linspace(0, scanned - 1, samples).round().astype(int).tolist()) if scanned and samples else set()
    for chunk in _chunks(scan(data, max_images), CHUNK):
        _offer(result.nearest, chunk, len(result.keys), data, features)
        for item in chunk:
            if len(result.keys) in picks:
                result.shown.append(item)
            result.keys.append(item.key)
    return result


def _rule(features: Recomputed, per_code: int, scanned: int) -> tuple[str, bool]:
    """(the nearest-patch rule as the page states it, whether patches are ranked by distance)."""
    among = f"of the patches carrying it in the {scanned} scanned samples (every stored view)"
    if features.extractor is not None:
        return (f"Each code shows the {per_code} patches nearest to its centroid {among}, {features.note} "
                "(distance: squared Euclidean, or 1 - cosine for L2-normalized features).", True)
    return (f"Each code shows a deterministic sample of {per_code} {among}, drawn by a priority seeded from each "
            f"sample's key, not ranked by distance: {features.note}.", False)


def build_report(root: str, out: Path, *, storage_options: dict | None = None, samples: int = 12,
                 per_code: int = 8, max_codes: int | None = None, max_images: int = MAX_IMAGES,
                 weights: str | None = None) -> Path:
    """Write a self-contained report of the dataset at ``root`` (directory or fsspec URL) into ``out``;
    returns ``out / "index.html"``.

    The page (inline CSS, no script, nothing fetched) links PNGs under ``out/assets/``: the tokenizer's numbers
    (utilization, perplexity, TCAS over the whole dataset, from its shard indexes), the usage histogram, the
    token-by-class heat map when labels exist, the k-means inertia curve when the dataset has a fit report; the
    codebook gallery (every code, or the ``max_codes`` most used, by usage; dead codes marked); token maps of
    ``samples`` samples, every stored view.

    Nearest-patch rule: only the first ``max_images`` samples are read (shards evenly spaced over the manifest
    first), so the time is bounded on any dataset. A code's ``per_code`` patches are, among the scanned patches
    whose stored token is that code, those nearest to its centroid when the features can be recomputed (the pixel
    extractor always; a learned one when its weights, ``weights`` or the local caches, are the codebook's), else a
    deterministic sample of them (priorities seeded from the sample keys). Patches are shown at the training
    view's resolution, the source key on hover.

    Reads only the manifest, the files it lists (shards checked against their sha256) and ``fit-report.json``.
    Raises ValueError subclasses naming the file and field when the dataset breaks its contract.
    """
    if samples < 0 or per_code < 1 or max_images < 1 or (max_codes is not None and max_codes < 0):
        raise ValueError("samples >= 0, per_code >= 1, max_images >= 1 and max_codes >= 0 (or None) are required")
    out = Path(out)
    (out / ASSETS).mkdir(parents=True, exist_ok=True)
    before = _report_pngs(out)
    with tempfile.TemporaryDirectory() as tmp:
        data = open_dataset(root, storage_options, Path(tmp))
        grid = data.spec.shape[-1]
        features = recompute(data.book.metadata, weights, data.extract_size, grid)
        kept = _scan(data, features, per_code, max_images, samples)
    rule, ranked = _rule(features, per_code, len(kept.keys))
    report = counts_report(data.counts, data.manifest["samples"])
    sections = [overview(data, len(kept.keys)), numbers(data, report, out),
                gallery(data, kept.nearest, kept.keys, rule, ranked, max_codes, out),
                token_maps(data, kept.shown, out)]
    index = out / "index.html"
    atomic_write_bytes(index, page(f"kmim report: {data.where}", sections).encode())
    # An earlier report's images this one did not rewrite (every write replaces the file: a new inode) are stale.
    after = _report_pngs(out)
    for path in [p for p, stamp in before.items() if after.get(p) == stamp]:
        path.unlink()
    return index


def _report_pngs(out: Path) -> dict[Path, tuple[int, int]]:
    """The images a report writes under ``out/assets`` (and only those: other files there are the user's), each
    with its (inode, mtime in ns)."""
    found = {}
    for pattern in ("*.png", "gallery/code-*.png", "maps/*-view*.png"):
        for path in (out / ASSETS).glob(pattern):
            st = path.stat()
            found[path] = (st.st_ino, st.st_mtime_ns)
    return found
