"""Sample order as pure functions of (seed, epoch, position): every DDP rank, DataLoader worker and resumed run
computes the same order and the same view per sample without communicating."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def epoch_order(counts: Sequence[int], seed: int, epoch: int, *, shuffle: bool = True,
                window: int = 4096) -> np.ndarray:
    """Global sample ids int64 [N] in this epoch's order; id = shard's offset (manifest order) + position in it.

    With ``shuffle``: shards in a random order, then samples shuffled within consecutive windows of
    ``window`` samples, all from ``np.random.default_rng([seed, epoch])``. Without: manifest order.
    """
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    if not shuffle:
        return np.arange(offsets[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(counts))
    ids = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm] or [np.zeros(0, np.int64)])
    keys = rng.random(len(ids))
    return ids[np.lexsort((keys, np.arange(len(ids)) // window))]


def pick_view(seed: int, epoch: int, index: int, views: int) -> int:
    """The view in [0, ``views``) that global sample ``index`` shows in ``epoch``: a pure function of its arguments."""
    return int(np.random.default_rng([seed, epoch, index, 1]).integers(views)) if views > 1 else 0
