"""Training loader: stream a committed kmim dataset as (image, token grid) batches, balanced across DDP ranks.

Sample order is a pure function of (seed, epoch, world layout), in the style of MosaicML Streaming:

1. :func:`epoch_order` permutes the shards, concatenates their sample ids, then shuffles within
   consecutive windows of ``shuffle_window`` samples (``np.random.default_rng([seed, epoch])``).
2. The global sequence is cut to ``world_size * samples_per_rank`` samples, a whole number of batches per
   rank: ``drop_last=True`` drops the tail of the shuffled order (a different tail each epoch);
   ``drop_last=False`` pads by repeating the order from its start. Every rank therefore yields the same
   number of full batches, so no DDP rank waits on another at the end of an epoch.
3. Rank ``r`` takes the contiguous slice ``[r * n, (r + 1) * n)``, so each rank reads mostly its own shards.
4. The rank's slice is cut into batches; DataLoader worker ``w`` of ``W`` builds batches ``w, w + W, ...``.
   ``DataLoader(batch_size=None)`` takes worker outputs round-robin in order, so the rank sees its slice
   exactly in sequence whatever the worker count, and "samples consumed" is a position in that slice:
   :class:`TokenLoader` resumes mid-epoch from two integers.

Reading: only shards the manifest lists, each read whole into memory and checked against the manifest
(size, sample count and, unless ``verify=False``, sha256 on every load). Remote shards (any non-local
fsspec URL) are cached on local disk by sha256, evicting the least recently used files beyond
``cache_bytes`` (:class:`~kmim.datasets.shard_store.ShardStore`); local shards are read in place.
Only the image member (decoded with the manifest's preprocessing and rendered with
:func:`~kmim.datasets.preprocess.render` from the recorded geometry, i.e. the exact view the tokens were computed
on), ``.tokens.npy`` (``allow_pickle=False``) and ``.json`` are decoded; other members are ignored, never unpickled.

Views: a dataset tokenized with V > 1 views stores V token grids per sample. In :meth:`TokenDataset.batches` each
(seed, epoch, sample id) picks one view by a pure function (:func:`pick_view`), so a resumed run and every DDP rank
see the same views; :meth:`TokenDataset.sample` and ``random_views=False`` (evaluation) use view 0, the center view.

Fresh crops (``crops=ViewSpec(...)``, supervised fine-tuning): every sample of every epoch is rendered from its
stored image as a new random resized crop + flip drawn from ``np.random.default_rng([seed, epoch, slot, 2])``
(``slot`` = the sample's position in the epoch's global sequence), so it resumes exactly too. Such a view has no
token grid: batches then carry no ``tokens`` and ``view`` is -1.

Memory per worker is about ``shuffle_window / samples_per_shard + 2`` shards' bytes: a window mixes
that many shards, and every worker of a rank reads each shard its batches touch.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kmim.datasets.augment import Augment
from kmim.datasets.geometry import ViewSpec, crop_geometry
from kmim.datasets.manifest import MANIFEST, ManifestError, parse_manifest
from kmim.datasets.order import epoch_order, pick_view
from kmim.datasets.preprocess import Preprocess, SkipImage, render
from kmim.datasets.samples import TokenSpec, decode_sample, view_problem
from kmim.datasets.shard_store import LoaderError, ShardStore, default_cache_dir
from kmim.datasets.shards import ShardError, iter_tar
from kmim.storage import join, redact_text

log = logging.getLogger("kmim")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _preprocess(manifest: dict, where: str) -> Preprocess:
    """The :class:`Preprocess` the manifest describes; refuses one :func:`decode_view` does not implement."""
    desc = manifest.get("preprocess") or {}
    try:
        pre = Preprocess.from_description(desc)
    except (KeyError, TypeError, ValueError) as e:
        raise LoaderError(f"{where}: incomplete 'preprocess' ({e})") from None
    if pre.describe() != desc:
        raise LoaderError(f"{where}: 'preprocess' {desc} is not the view this kmim version decodes "
                          f"({pre.describe()})")
    return pre


def open_manifest(root: str | os.PathLike, *, expect_tokenizer_id: str | None = None,
                  storage_options: dict | None = None) -> dict:
    """Read and check ``<root>/manifest.json`` (a local path or any fsspec URL); return it.

    Raises :class:`LoaderError` when the manifest is missing or breaks the contract
    (:func:`~kmim.datasets.manifest.check_manifest`: e.g. a shard path that is not a plain ``*.tar`` name inside
    the dataset directory), its token grid is not [h, w] (or [V, h, w] with V views) tiling the preprocessing's
    view, or its ``tokenizer_id`` is not ``expect_tokenizer_id``.
    """
    url = join(os.fspath(root), MANIFEST)
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            manifest = parse_manifest(f.read(), url)
    except FileNotFoundError:
        # fsspec's HTTP filesystem reports a refused request (401, 403) as not found too.
        refused = ("; or the server refused the request: a `kmim serve --token` needs storage_options "
                   "{'client_kwargs': {'headers': {'Authorization': 'Bearer ...'}}}"
                   if url.startswith(("http://", "https://")) else "")
        raise LoaderError(f"{url}: no manifest (the dataset is missing or was never committed{refused})") from None
    except ManifestError as e:
        raise LoaderError(str(e)) from None
    if expect_tokenizer_id is not None and manifest.get("tokenizer_id") != expect_tokenizer_id:
        raise LoaderError(f"{url}: tokenizer_id {manifest.get('tokenizer_id')!r} is not the expected "
                          f"{expect_tokenizer_id!r} (tokens from another codebook)")
    pre = _preprocess(manifest, url)
    grid = manifest["token_grid"]
    p = grid.get("patch_size")
    tiles = isinstance(p, int) and p > 0 and pre.image_size % p == 0
    if not (tiles and len(grid["shape"]) in (2, 3) and grid["shape"][-2:] == [pre.image_size // p] * 2):
        raise LoaderError(f"{url}: token grid {grid} does not tile the {pre.image_size}px view as [h, w] or [V, h, w]")
    return manifest


def common_tokenizer_id(roots: Sequence[str | os.PathLike], storage_options: dict | None = None) -> str:
    """The tokenizer_id the datasets at ``roots`` share (their tokens come from one codebook, so they can be
    trained on together); each manifest is checked as :func:`open_manifest` does. Raises :class:`LoaderError`
    naming the first dataset whose tokenizer_id differs from the first one's, or when ``roots`` is empty."""
    if not roots:
        raise LoaderError("no datasets given")
    first = open_manifest(roots[0], storage_options=storage_options)["tokenizer_id"]
    for root in roots[1:]:
        found = open_manifest(root, storage_options=storage_options)["tokenizer_id"]
        if found != first:
            raise LoaderError(f"{redact_text(os.fspath(root))}: tokenizer_id {found!r} differs from {first!r} of "
                              f"{redact_text(os.fspath(roots[0]))} (tokens from another codebook)")
    return first


def _dist_layout() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenDataset(IterableDataset):
    """One rank's view of a kmim dataset: an iterable of whole batches in a fixed, resumable order.

    Each batch is a dict: ``image`` float32 [B, 3, S, S] (normalized with ``mean`` / ``std`` over [0, 1]
    pixels), ``tokens`` int64 [B, h, w], ``label`` int64 [B] (-1 = none), ``key`` list[str] of B,
    ``index`` int64 [B] (global sample ids, see :func:`epoch_order`), ``view`` int64 [B] (the stored view shown,
    see :func:`pick_view`; 0 with ``random_views=False``; -1 for fresh ``crops``, which carry no ``tokens``),
    ``flip`` bool [B] (whether that view is mirrored).

    ``rank`` / ``world_size`` default to torch.distributed's when initialized, else 0 / 1. Iteration yields
    this rank's batches of epoch :attr:`epoch` from sample position :attr:`start`, split across DataLoader
    workers; use :class:`TokenLoader` rather than iterating directly, it owns epoch and position.
    """

    def __init__(self, root: str | os.PathLike, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 shuffle_window: int = 4096, drop_last: bool = True, rank: int | None = None,
                 world_size: int | None = None, expect_tokenizer_id: str | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: Augment | None = None, random_views: bool = True, crops: ViewSpec | None = None,
                 verify: bool = True,
                 cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = 16 << 30, storage_options: dict | None = None):
        if batch_size < 1 or shuffle_window < 1 or cache_bytes < 0:
            raise ValueError("batch_size and shuffle_window must be >= 1, cache_bytes >= 0")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        rank, world_size = _dist_layout() if rank is None else (rank, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.root = os.fspath(root)
        self.manifest = open_manifest(self.root, expect_tokenizer_id=expect_tokenizer_id,
                                      storage_options=storage_options)
        self.batch_size, self.seed, self.shuffle, self.shuffle_window = batch_size, seed, shuffle, shuffle_window
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.augment, self.random_views, self.crops = augment or Augment(), random_views, crops
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.shards = [e["path"] for e in self.manifest["shards"]]
        self.counts = [e["samples"] for e in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self._pre = _preprocess(self.manifest, self.root)
        self._spec = TokenSpec.of(self.manifest)
        self._store = ShardStore(self.root, {e["path"]: e for e in self.manifest["shards"]}, storage_options or {},
                                 verify, Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                                 cache_bytes)
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()
        self._cache_size = 2
        n, global_batch = int(self.offsets[-1]), batch_size * world_size
        per_rank = batch_size * (n // global_batch if drop_last else math.ceil(n / global_batch))
        if per_rank == 0:
            raise LoaderError(f"{self.root}: {n} samples are fewer than one global batch "
                              f"({world_size} ranks x {batch_size})" + ("; use drop_last=False to pad" if n else ""))
        self.samples_per_rank = per_rank
        self.epoch, self.start = 0, 0
        extra = per_rank * world_size - n
        policy = (f"drop_last=False: repeating {extra} samples" if extra > 0 else
                  f"drop_last=True: dropping {-extra} samples" if extra < 0 else "no remainder")
        log.info("loader %s: %d samples in %d shards; rank %d/%d gets %d batches of %d per epoch (%s per epoch)",
                 self.root, n, len(self.shards), rank, world_size, self.batches_per_epoch, batch_size, policy)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}  # workers start with empty shard caches

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_rank // self.batch_size

    def rank_sequence(self, epoch: int) -> np.ndarray:
        """This rank's global sample ids int64 [samples_per_rank] for ``epoch``, in the order they are yielded."""
        order = epoch_order(self.counts, self.seed, epoch, shuffle=self.shuffle, window=self.shuffle_window)
        n = self.samples_per_rank
        seq = order[:n * self.world_size] if self.drop_last else np.resize(order, n * self.world_size)
        return seq[self.rank * n:(self.rank + 1) * n]

    def read_shard(self, name: str) -> list[dict[str, bytes | str]]:
        """The raw samples ``{"__key__": key, ext: bytes}`` of a manifest-listed shard, checked against the manifest."""
        data = self._store.read(name)
        samples = list(iter_tar(io.BytesIO(data), name))
        expected = self._store.entries[name]["samples"]
        if len(samples) != expected:
            raise LoaderError(f"{name}: {len(samples)} samples, manifest says {expected}")
        return samples

    def _raw(self, index: int) -> tuple[dict, str]:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if shard in self._cache:
            self._cache.move_to_end(shard)
        else:
            self._cache[shard] = self.read_shard(self.shards[shard])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[shard][index - int(self.offsets[shard])], self.shards[shard]

    def _decode(self, index: int, view: int, rng: np.random.Generator | None,
                crop_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None, int, str, dict]:
        """(image float32 [3, S, S], tokens int64 [h, w], label, key, geometry) of stored view ``view`` of one
        global sample id, colour-augmented with ``rng`` unless it is None; with ``crop_rng``, a fresh crop
        (:attr:`crops`) drawn from it instead of the stored view, and tokens None."""
        sample, name = self._raw(index)
        where = f"{name}: sample {sample['__key__']}"
        try:
            checked, source = decode_sample(sample, self._spec, self._pre, where)
        except ShardError as e:
            raise LoaderError(str(e)) from None
        geometry, size = checked.geometry[view], self._pre.image_size
        if crop_rng is not None:
            geometry = crop_geometry(*source.image.size, self.crops, crop_rng)
        elif (problem := view_problem(geometry, view, source, size)) is not None:
            raise LoaderError(f"{where}: {problem}")
        try:  # the scaled render method decodes inside render
            pixels = render(source.image, geometry, size).astype(np.float32) / 255.0
        except SkipImage as e:
            raise LoaderError(f"{where}: stored image does not decode ({e})") from None
        if rng is not None:
            pixels = self.augment.apply(pixels, rng)
        image = ((pixels - self.mean) / self.std).transpose(2, 0, 1)
        tokens = None if crop_rng is not None else (checked.tokens if checked.tokens.ndim == 2 else
                                                    checked.tokens[view]).astype(np.int64)
        label = checked.meta.get("label")
        return image, tokens, -1 if label is None else int(label), checked.key, geometry

    def sample(self, index: int, view: int = 0) -> dict:
        """One sample by global id, its stored view ``view`` (default: the center view, the evaluation view) without
        augmentation: ``image`` float32 [3, S, S], ``tokens`` int64 [h, w], ``label`` int (-1 = none), ``key`` str,
        ``view`` dict (the view's geometry)."""
        if not 0 <= index < self.offsets[-1]:
            raise IndexError(f"sample {index} out of range [0, {int(self.offsets[-1])})")
        if not 0 <= view < self._spec.views:
            raise IndexError(f"view {view} out of range [0, {self._spec.views})")
        image, tokens, label, key, geometry = self._decode(index, view, None)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "tokens": torch.from_numpy(tokens),
                "label": label, "key": key, "view": geometry}

    def batches(self, epoch: int, start: int = 0, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        """Batches ``worker``, ``worker + workers``, ... of this rank's ``epoch`` counted from sample ``start``.

        The rank's samples ``[start, samples_per_rank)`` are cut into batches of ``batch_size`` from ``start``;
        only a ``start`` that is not a multiple of ``batch_size`` leaves a short last batch.
        """
        seq = self.rank_sequence(epoch)
        if self.shuffle:
            shard_of = np.searchsorted(self.offsets, seq, side="right") - 1
            window_of = (self.rank * self.samples_per_rank + np.arange(len(seq))) // self.shuffle_window
            pairs = np.unique(window_of * len(self.shards) + shard_of)
            # A window mixes this many shards; one more spares re-reads where windows meet.
            self._cache_size = int(np.bincount(pairs // len(self.shards)).max()) + 1
        for j, b0 in enumerate(range(start, len(seq), self.batch_size)):
            if j % workers == worker:
                yield self._batch(seq[b0:b0 + self.batch_size], epoch, self.rank * self.samples_per_rank + b0)

    def _batch(self, ids: np.ndarray, epoch: int, first_slot: int) -> dict:
        """The batch of global sample ids ``ids`` int64 [B] of ``epoch``, the first at global position
        ``first_slot`` of the epoch's sequence (which seeds its augmentation)."""
        views = self._spec.views if self.random_views else 1
        picked = [-1 if self.crops else pick_view(self.seed, epoch, int(i), views) for i in ids]
        out = []
        for slot, i, v in zip(range(first_slot, first_slot + len(ids)), ids, picked, strict=True):
            rng = np.random.default_rng([self.seed, epoch, slot]) if self.augment.active else None
            crop_rng = np.random.default_rng([self.seed, epoch, slot, 2]) if self.crops else None
            out.append(self._decode(int(i), max(v, 0), rng, crop_rng))
        batch = {"image": torch.from_numpy(np.stack([o[0] for o in out])),
                 "label": torch.tensor([o[2] for o in out], dtype=torch.int64), "key": [o[3] for o in out],
                 "index": torch.from_numpy(ids.copy()), "view": torch.tensor(picked, dtype=torch.int64),
                 "flip": torch.tensor([o[4]["flip"] for o in out], dtype=torch.bool)}
        if self.crops is None:
            batch["tokens"] = torch.from_numpy(np.stack([o[1] for o in out]))
        return batch

    def stream(self, epoch: int, start: int = 0, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        """This rank's batches from ``epoch`` / sample ``start`` on, epoch after epoch, without end.

        Batches are numbered continuously across epochs and ``worker`` takes every ``workers``-th, so a
        DataLoader's round-robin over its workers yields them in order across epoch boundaries.
        """
        skip = worker
        while True:
            yield from self.batches(epoch, start, skip, workers)
            skip = (skip - math.ceil((self.samples_per_rank - start) / self.batch_size)) % workers
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.stream(self.epoch, self.start, worker, workers)


class TokenLoader:
    """Iterates a :class:`TokenDataset` through a DataLoader and tracks (epoch, samples consumed) for resume.

    Each ``iter()`` yields the rest of the current epoch from the current position and advances to the next
    epoch once the last batch is handed out; stopping early keeps the position. The workers stream batches
    across epoch boundaries (:meth:`TokenDataset.stream`), so they start once, not per epoch, and prefetch
    into the next epoch; they are restarted only when the position changes otherwise (``load_state_dict``).
    """

    def __init__(self, dataset: TokenDataset, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context: str | None = None):
        self.dataset = dataset
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.epoch, self.samples = 0, 0
        self._stream: Iterator[dict] | None = None
        self._stream_at: tuple[int, int] | None = None  # (epoch, samples) of the stream's next batch

    def __len__(self) -> int:
        """Batches the next ``iter()`` yields."""
        return math.ceil((self.dataset.samples_per_rank - self.samples) / self.dataset.batch_size)

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        if self._stream is None or self._stream_at != (self.epoch, self.samples):
            self._stream = None  # shuts down the old workers
            ds.epoch, ds.start = self.epoch, self.samples
            self._stream = iter(DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.multiprocessing_context if self.num_workers else None))
        epoch = self.epoch
        while self.epoch == epoch:
            batch = next(self._stream)
            self.samples += len(batch["key"])
            if self.samples >= ds.samples_per_rank:
                # Advance before handing out the last batch, so a checkpoint taken after it resumes next epoch.
                self.epoch, self.samples = self.epoch + 1, 0
            self._stream_at = (self.epoch, self.samples)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and ``samples`` (consumed by this rank in it), plus ``seed`` and ``world_size`` to check."""
        return {"epoch": self.epoch, "samples": self.samples, "seed": self.dataset.seed,
                "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where :meth:`state_dict` was taken: the next batches are those an uninterrupted run yields."""
        ds = self.dataset
        for field, own in (("seed", ds.seed), ("world_size", ds.world_size)):
            if state[field] != own:
                raise ValueError(f"loader state has {field}={state[field]}, this loader {own}: the sample order "
                                 "differs, so the run cannot resume exactly")
        if not 0 <= state["samples"] <= ds.samples_per_rank:
            raise ValueError(f"loader state samples={state['samples']} is not in [0, {ds.samples_per_rank}]")
        self.epoch, self.samples = int(state["epoch"]), int(state["samples"])
        if self.samples == ds.samples_per_rank:
            self.epoch, self.samples = self.epoch + 1, 0
