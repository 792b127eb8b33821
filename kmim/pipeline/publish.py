"""``kmim publish``: copy a committed local dataset to a directory or any fsspec URL, the manifest last.

Files go up in parallel, each checked (size and sha256) before it counts; a file already there with the right
size and sha256 is skipped, so an interrupted publish resumes where it stopped, and a partial or corrupt object
left at the destination is replaced. Shards are checked against the source manifest before they leave. Until
every file landed, the destination has no manifest: a dataset without one does not exist.
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from fsspec import AbstractFileSystem
from tqdm import tqdm

from kmim.datasets.manifest import JOB_FILE, MANIFEST, read_manifest
from kmim.files import sha256_file
from kmim.storage import join, list_sizes, open_url, put_verified, redact, sha256_remote, url_of

WORKERS = 8


class PublishError(RuntimeError):
    """The source is not a committed dataset, does not match its manifest, or some files failed to upload."""


def dataset_files(src: Path, manifest: dict) -> dict[str, tuple[str, int] | None]:
    """``{relative name: (sha256, bytes) the manifest records, or None}`` of every file of a committed dataset
    except its manifest: the codebook, each shard and its index, and the job record if there is one."""
    files: dict[str, tuple[str, int] | None] = {manifest["codebook"]["path"]: None}
    for entry in manifest["shards"]:
        files[entry["index"]] = None
        files[entry["path"]] = (entry["sha256"], entry["bytes"])
    if (src / JOB_FILE).is_file():
        files[JOB_FILE] = None
    return files


def _publish_file(local: Path, fs: AbstractFileSystem, path: str, expected: tuple[str, int] | None,
                  there: int | None) -> int | None:
    """Upload one file unless the destination already holds it (``there``: its size there, None = absent);
    return the bytes uploaded, None if skipped."""
    try:
        regular = stat.S_ISREG(os.lstat(local).st_mode)
    except FileNotFoundError:
        raise PublishError(f"{local}: missing") from None
    if not regular:  # a symlink could point anywhere on this machine; a FIFO or device never ends
        raise PublishError(f"{local}: not a regular file (symlinks and special files are never published)")
    sha, size = sha256_file(local)
    if expected is not None and (sha, size) != expected:
        raise PublishError(f"{local}: differs from the source manifest (size or sha256); run kmim verify on it")
    if there == size and sha256_remote(fs, path) == (sha, size):
        return None
    put_verified(local, fs, path, sha256=sha, size=size)
    return size


def publish(src: str | Path, url: str, storage_options: dict | None = None, *, workers: int = WORKERS) -> dict:
    """Copy the committed dataset in directory ``src`` to ``url``; return a summary (files, bytes, seconds).

    Raises :class:`PublishError` (nothing committed at ``url``) when ``src`` has no manifest, a shard does not
    match it, ``url`` already holds a different dataset, or any file fails to upload.
    """
    t0 = time.perf_counter()
    src = Path(src)
    try:
        manifest = read_manifest(src)
    except (OSError, ValueError) as e:
        raise PublishError(f"refusing to publish {src}: {e}") from None
    fs, root = open_url(url, storage_options)
    where = redact(url)
    there = list_sizes(fs, root)
    committed = MANIFEST in there and sha256_remote(fs, join(root, MANIFEST)) == sha256_file(src / MANIFEST)
    if MANIFEST in there and not committed:
        raise PublishError(f"{where} already holds another dataset (its manifest differs); publish to a new URL")
    files = dataset_files(src, manifest)
    uploaded, nbytes, failures = 0, 0, []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(files), desc="publish", unit="file", dynamic_ncols=True) as bar:
        futures = {pool.submit(_publish_file, src / name, fs, join(root, name), expected, there.get(name)): name
                   for name, expected in files.items()}
        for future in as_completed(futures):
            try:
                size = future.result()
            except (OSError, RuntimeError) as e:
                failures.append(f"{futures[future]}: {e}")
            else:
                uploaded, nbytes = uploaded + (size is not None), nbytes + (size or 0)
            bar.update()
    if failures:
        raise PublishError(f"{len(failures)} of {len(files)} files failed; no manifest written at {where} "
                           "(rerun to resume):\n  " + "\n  ".join(sorted(failures)))
    if not committed:
        put_verified(src / MANIFEST, fs, join(root, MANIFEST))
    return {"url": url_of(fs, root), "files": len(files) + 1, "files_uploaded": uploaded + (not committed),
            "bytes_uploaded": nbytes, "samples": manifest["samples"], "seconds": time.perf_counter() - t0}
