"""The codebook artifact: safetensors ``centroids`` float32 [K, D] plus JSON metadata and a tokenizer_id.

``tokenizer_id`` is a digest of the metadata (extractor, weights digest, geometry, normalization, K,
k-means settings, fit-sample digest) and the centroid bytes: two codebooks with the same id produce
identical tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from fsspec import AbstractFileSystem
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from kmim.files import atomic_write_bytes
from kmim.storage import get_file, is_local

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


def save_codebook(path: str | os.PathLike, book: Codebook) -> None:
    """Write atomically (temp file + rename), with the same file mode as every other output (umask applies)."""
    meta = {"tokenizer_id": book.tokenizer_id, _META_KEY: json.dumps(book.metadata, sort_keys=True)}
    data = save({"centroids": book.centroids.float().contiguous()}, metadata=meta)
    atomic_write_bytes(path, _metadata_in_order(data, list(meta)))


def _metadata_in_order(data: bytes, keys: list[str]) -> bytes:
    """Safetensors bytes ``data`` with the ``__metadata__`` entries of its header in the order ``keys``.

    safetensors writes them from a Rust HashMap, in an order that differs from process to process, so the same
    codebook would not always give the same bytes (``tests/test_golden.py`` pins tokenizer_id first). Only the
    order changes, hence neither the header's length (an 8-byte little-endian count, then the compact JSON header
    padded with spaces) nor the tensor offsets.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {key: header["__metadata__"][key] for key in keys}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return data[:8] + text.ljust(n) + data[8 + n:]


def load_codebook(path: str | Path, where: str | None = None) -> Codebook:
    """Load a codebook and check it: one float32 ``centroids`` tensor [K, D], K >= 1, kmim metadata, and a stored
    tokenizer_id that matches the content. Raises ValueError naming ``where`` (default: ``path``)."""
    where = where or str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            centroids = f.get_tensor("centroids") if names == {"centroids"} else None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{where}: not a safetensors file ({e})") from None
    if _META_KEY not in meta:
        raise ValueError(f"{where}: not a kmim codebook (no '{_META_KEY}' metadata)")
    if centroids is None:
        raise ValueError(f"{where}: expected exactly one tensor 'centroids', found {sorted(names)}")
    if centroids.dtype != torch.float32 or centroids.ndim != 2 or min(centroids.shape) < 1:
        raise ValueError(f"{where}: 'centroids' is {centroids.dtype}{list(centroids.shape)}, expected float32 [K, D]")
    try:
        metadata = json.loads(meta[_META_KEY])
    except ValueError as e:
        raise ValueError(f"{where}: metadata is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: metadata is not a JSON object")
    book = Codebook(centroids, metadata)
    if book.tokenizer_id != meta.get("tokenizer_id"):
        raise ValueError(f"{where}: tokenizer_id {meta.get('tokenizer_id')} does not match its content")
    return book


def load_codebook_at(fs: AbstractFileSystem, path: str, where: str | None = None) -> Codebook:
    """:func:`load_codebook` of the file at ``path`` on ``fs``: in place on local disk, else through a temporary copy
    (safetensors reads files). Raises FileNotFoundError when there is no file there, ValueError naming ``where``
    (default: ``path``) when it is not a kmim codebook."""
    if is_local(fs):
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return load_codebook(path, where)
    with tempfile.TemporaryDirectory(prefix="kmim-codebook-") as d:
        get_file(fs, path, Path(d) / "codebook.safetensors")
        return load_codebook(Path(d) / "codebook.safetensors", where or path)
