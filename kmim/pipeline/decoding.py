"""Decode an input shard into views, in input order, for both stages; and keep what the fit-sample stage decoded
for the tokenize stage of the same shard in the same process (:func:`keep_decoded`), so that a local job decodes
each image once.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kmim.datasets.preprocess import Preprocess, SkipImage, Views, ViewSpec, decode_views
from kmim.pipeline.sources import InputShard, RawSample, SourceSpec, read_shard, recorded_name

log = logging.getLogger("kmim")

# Images stored in fewer bytes are decoded by the thread that consumes them: their decode is mostly Python holding
# the GIL, and two threads decoded 32-96 px JPEGs (1.6-6.7 KB) and 32 px PNGs (3.7 KB) at 0.5-0.78x the speed of one;
# a 64 px PNG (12 KB) at 1.05x, larger images at 1.4-1.9x (benchmarks/decode_threads.py).
INLINE_BYTES = 8 << 10

Decoded = tuple[RawSample, Views | None, str | None]  # (raw sample, views or None, skip reason or None)


def sample_key(source: str) -> str:
    """Stable 16-hex-digit key of an input; sources are unique within a dataset, hence keys too (a file name that
    is not UTF-8 is keyed by its bytes)."""
    return hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class DecodeSpec:
    """How a stage turns an input shard into views: read as ``source`` says, each image decoded once on ``threads``
    threads (None: the CPUs this process may use, which Ray sets per worker) into the ``views`` of ``preprocess``'s
    size, which the extractor sees rendered at ``extract_size`` px."""

    source: SourceSpec
    preprocess: Preprocess
    threads: int | None
    views: ViewSpec
    extract_size: int


def _decode_one(raw: RawSample, decode: DecodeSpec) -> Decoded:
    """(raw, views, None), or (raw, None, skip reason) with a warning naming the input and why it is skipped."""
    if raw.skip is not None:
        reason, detail = raw.skip, raw.detail
    else:
        try:
            return raw, decode_views(raw.data or b"", decode.preprocess, decode.views, sample_key(raw.source),
                                     decode.extract_size), None
        except SkipImage as e:
            reason, detail = e.reason, e.detail
    log.warning("skipped %s: %s%s", recorded_name(raw.source), reason, f" ({detail})" if detail else "")
    return raw, None, reason


def decoded(shard: InputShard, decode: DecodeSpec, start: int = 0) -> Iterator[Decoded]:
    """The decoded inputs of the shard from its ``start``-th on, in order.

    Decodes on ``decode.threads`` threads (default: the CPUs this process may use, which Ray sets
    per worker), so a GPU worker's batch is decoded by all the cores it holds, in the same process that
    extracts and assigns it; images under :data:`INLINE_BYTES` are decoded by the consuming thread. At most 4
    images per thread are decoded ahead of the consumer.
    """
    raws = read_shard(shard, decode.source, start)
    threads = decode.threads or torch.get_num_threads()
    if threads == 1:
        yield from (_decode_one(raw, decode) for raw in raws)
        return
    ahead: deque[Future | RawSample] = deque()  # a small image waits as its raw sample, decoded when its turn comes

    def done(item: Future | RawSample) -> Decoded:
        return item.result() if isinstance(item, Future) else _decode_one(item, decode)

    with ThreadPoolExecutor(threads, thread_name_prefix="kmim-decode") as pool:
        try:
            for raw in raws:
                small = len(raw.data or b"") < INLINE_BYTES
                ahead.append(raw if small else pool.submit(_decode_one, raw, decode))
                if len(ahead) >= 4 * threads:
                    yield done(ahead.popleft())
            while ahead:
                yield done(ahead.popleft())
        finally:  # the consumer may stop early (the fit sample needs only the first images)
            for item in ahead:
                if isinstance(item, Future):
                    item.cancel()


# ---- decoding once per job ------------------------------------------------------------------------------

@dataclass
class _Kept:
    """The decoded shard prefixes this process holds, by (shard, decode spec), each with its size in bytes."""

    budget: int = 0  # bytes the prefixes may hold (0: keep nothing)
    used: int = 0
    prefixes: dict[tuple[InputShard, DecodeSpec], tuple[list[Decoded], int]] = field(default_factory=dict)


_KEPT = _Kept()


def _nbytes(items: list[Decoded]) -> int:
    return sum(len(raw.data or b"") + (v.pixels.nbytes + v.extract.nbytes * (v.extract is not v.pixels) + len(v.data)
                                       if v is not None else 0) for raw, v, _ in items)


@contextmanager
def keep_decoded(budget: int) -> Iterator[None]:
    """Within the block, :func:`keep` holds up to ``budget`` bytes of decoded shard prefixes in this process for
    :func:`decoded_once`; all are dropped when the block ends. A local job runs its fit and its tokenization in one
    such block, so the images the fit sample decoded are not decoded again (each image is decoded the same way by
    both stages: same :class:`DecodeSpec`, hence the same pixels)."""
    _KEPT.budget, _KEPT.used = budget, 0
    try:
        yield
    finally:
        _KEPT.prefixes.clear()
        _KEPT.budget = _KEPT.used = 0


def keep(shard: InputShard, decode: DecodeSpec, prefix: list[Decoded]) -> None:
    """Keep the first ``len(prefix)`` decoded inputs of the shard for :func:`decoded_once`, if the budget allows."""
    size = _nbytes(prefix) if prefix and _KEPT.budget else 0
    if size and _KEPT.used + size <= _KEPT.budget:
        _KEPT.prefixes[(shard, decode)] = prefix, size
        _KEPT.used += size


def decoded_once(shard: InputShard, decode: DecodeSpec) -> Iterator[Decoded]:
    """:func:`decoded` of the whole shard, taking the prefix :func:`keep` holds for it (once) instead of decoding
    it again."""
    prefix, size = _KEPT.prefixes.pop((shard, decode), ([], 0))
    _KEPT.used -= size
    yield from prefix
    yield from decoded(shard, decode, len(prefix))
