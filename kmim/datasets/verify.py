"""``kmim verify``: re-read every shard of a committed dataset and check it against the manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kmim.datasets.manifest import CODEBOOK, read_index, read_index_stats, read_manifest
from kmim.datasets.preprocess import IMAGE_EXTS
from kmim.datasets.shards import decode_npy, iter_tar, sample_meta, sha256_file
from kmim.tokenizers.codebook import load_codebook


def _check_shard(root: Path, entry: dict, manifest: dict, keys: set[str]) -> list[str]:
    name = entry["path"]
    path = root / name
    if not path.is_file():
        return [f"{name}: missing"]
    digest, size = sha256_file(path)
    problems = []
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...")
    k = manifest["codebook"]["k"]
    shape = tuple(manifest["token_grid"]["shape"])
    dtype = np.dtype(manifest["token_grid"]["dtype"])
    tar_keys, counts = [], {}
    try:
        with open(path, "rb") as f:
            for sample in iter_tar(f, name):
                key = sample["__key__"]
                tar_keys.append(key)
                where = f"{name}: sample {key}"
                if key in keys:
                    problems.append(f"{where}: key also appears in another shard")
                keys.add(key)
                images = [e for e in IMAGE_EXTS if e in sample]
                if len(images) != 1:
                    problems.append(f"{where}: expected one image member, found {images or 'none'}")
                meta = sample_meta(sample, name)
                if meta.get("key") != key:
                    problems.append(f"{where}: .json key does not match the member name")
                if "tokens.npy" not in sample:
                    problems.append(f"{where}: no .tokens.npy")
                    continue
                tokens = decode_npy(sample["tokens.npy"])
                if tokens.dtype != dtype or tokens.shape != shape:
                    problems.append(f"{where}: tokens {tokens.dtype}{list(tokens.shape)}, "
                                    f"manifest says {dtype}{list(shape)}")
                elif tokens.size and (int(tokens.max()) >= k or int(tokens.min()) < 0):
                    problems.append(f"{where}: token {int(tokens.max())} out of range for K={k}")
                else:
                    label = -1 if meta.get("label") is None else meta["label"]
                    counts[label] = counts.get(label, 0) + np.bincount(tokens.ravel(), minlength=k)
    except Exception as e:  # noqa: BLE001 - any parse failure of a shard is a verification failure
        return problems + [f"{name}: unreadable: {type(e).__name__}: {e}"]
    if len(tar_keys) != entry["samples"]:
        problems.append(f"{name}: {len(tar_keys)} samples, manifest says {entry['samples']}")
    index_path = root / entry["index"]
    if not index_path.is_file():
        return problems + [f"{entry['index']}: missing"]
    index = read_index(index_path).to_pydict()
    ok_keys = [k_ for k_, s in zip(index["key"], index["status"], strict=True) if s == "ok"]
    if ok_keys != tar_keys:
        problems.append(f"{entry['index']}: 'ok' rows do not match the samples in {name}")
    tc = read_index_stats(index_path)["token_counts"]
    stored: dict[int, np.ndarray] = {}
    for label, token, count in zip(tc["label"], tc["token"], tc["count"], strict=True):
        stored.setdefault(label, np.zeros(k, np.int64))[token] += count
    if sorted(stored) != sorted(counts) or any(not np.array_equal(stored[lab], counts[lab]) for lab in counts):
        problems.append(f"{entry['index']}: token counts do not match the tokens in {name}")
    return problems


def verify_dataset(root: str | Path, progress: Callable[[str], None] | None = None) -> list[str]:
    """Return a list of problems (empty = the dataset is intact)."""
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as e:
        return [str(e)]
    problems: list[str] = []
    book = root / manifest["codebook"]["path"] if "codebook" in manifest else root / CODEBOOK
    if not book.is_file():
        problems.append(f"{book.name}: missing")
    else:
        try:
            if load_codebook(book).tokenizer_id != manifest["tokenizer_id"]:
                problems.append(f"{book.name}: tokenizer_id differs from the manifest's")
        except (OSError, ValueError) as e:
            problems.append(f"{book.name}: {e}")
    keys: set[str] = set()
    total = 0
    for entry in manifest["shards"]:
        if progress is not None:
            progress(entry["path"])
        problems += _check_shard(root, entry, manifest, keys)
        total += entry["samples"]
    if total != manifest["samples"]:
        problems.append(f"manifest: shards hold {total} samples, 'samples' says {manifest['samples']}")
    return problems
