"""The codebook artifact: safetensors ``centroids`` float32 [K, D] plus JSON metadata and a tokenizer_id.

``tokenizer_id`` is a digest of the metadata (extractor, weights digest, geometry, normalization, K,
k-means settings, fit-sample digest) and the centroid bytes: two codebooks with the same id produce
identical tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kmim.datasets.shards import tmp_path

_META_KEY = "kmim"


@dataclass(frozen=True)
class Codebook:
    centroids: torch.Tensor  # float32 [K, D]
    metadata: dict

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def tokenizer_id(self) -> str:
        return tokenizer_id(self.centroids, self.metadata)


def tokenizer_id(centroids: torch.Tensor, metadata: dict) -> str:
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    h.update(centroids.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def save_codebook(path: Path, book: Codebook) -> None:
    """Write atomically (temp file + rename)."""
    tmp = tmp_path(Path(path))
    meta = {_META_KEY: json.dumps(book.metadata, sort_keys=True), "tokenizer_id": book.tokenizer_id}
    try:
        save_file({"centroids": book.centroids.float().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_codebook(path: str | Path) -> Codebook:
    """Load and check that the stored tokenizer_id matches the content."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path}: not a kmim codebook (no '{_META_KEY}' metadata)")
    book = Codebook(load_file(str(path))["centroids"], json.loads(meta[_META_KEY]))
    if book.tokenizer_id != meta.get("tokenizer_id"):
        raise ValueError(f"{path}: tokenizer_id {meta.get('tokenizer_id')} does not match its content")
    return book
