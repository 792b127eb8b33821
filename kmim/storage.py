"""Object storage through fsspec: open any URL's filesystem, and uploads that only count once checked.

A file counts as uploaded once its stored bytes were read back and matched (size and sha256). Object stores
(S3, GCS, Azure) make an object visible all-or-nothing (a PUT, a completed multipart or resumable upload), so
files go straight to their final name there; other filesystems get a hidden temporary name, renamed once checked.
fsspec's writable file objects are never used for outputs: they commit on ``__exit__`` even when the block raised.

Credentials and endpoints come from each filesystem's usual environment and config files (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``...) or from ``storage_options``; neither is ever put into a
message here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from kmim.files import atomic_write, sha256_file, sha256_stream, tmp_path
from kmim.retry import RetryPolicy, is_io_transient

log = logging.getLogger("kmim")

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
UPLOAD_ATTEMPTS = 4
BACKOFF_S = 0.5  # the wait after failed attempt n (1-based) is BACKOFF_S * 2**(n - 1) seconds
try:
    from botocore.exceptions import BotoCoreError

    SERVICE_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError,)
except ImportError:
    SERVICE_ERRORS = ()


class UploadError(RuntimeError):
    """An upload that failed permanently or ran out of retries; the message names the file and the URL.

    Not an OSError: uploads are retried here, so a caller's generic I/O retry (e.g. the runner's, which would
    recompute a whole shard) must not retry them again.
    """


class _Mismatch(OSError):
    """The stored object differs from the local file (size or sha256); it was deleted and the upload is retried."""


def open_url(url: str, storage_options: dict | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``url`` (a path or any fsspec URL) and the path inside it."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_object_store(fs: AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & OBJECT_STORES)


def join(root: str, name: str) -> str:
    """``root/name`` for a path or URL."""
    return root.rstrip("/") + "/" + name


# fsspec adapters: the only two places kmim calls private fsspec API; tests/test_adapters.py fails with a clear
# message when an fsspec release changes either.


def fs_parent(fs: AbstractFileSystem, path: str) -> str:
    """The directory holding ``path`` on ``fs``, via fsspec's private ``fs._parent`` (the one place it is used)."""
    return fs._parent(path)


def fs_path(fs: AbstractFileSystem, path: str) -> str:
    """``path`` (or a URL of ``fs``) as ``fs`` names it internally, e.g. the keys of ``fs.cat``'s result: via
    fsspec's private ``fs._strip_protocol`` (the one place it is used)."""
    return fs._strip_protocol(path)


# Query parameters that carry credentials: presigned S3 / GCS URLs, Azure SAS, CloudFront, OAuth, API keys.
_SECRET_PARAM = re.compile(r"(sig|signature|token|credential|secret|password|passwd|pwd|key|auth|policy|session)",
                           re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_query(query: str) -> str:
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}=***" if eq and _SECRET_PARAM.search(name) else part)
    return "&".join(parts)


def redact(url: str) -> str:
    """``url`` for a message or a record: any ``user:password@`` part and the values of query parameters that
    look like credentials (signatures, tokens, keys: presigned URLs) become ``***``."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
    head, q, query = url.partition("?")
    if not q:
        return url
    query, h, fragment = query.partition("#")
    return f"{head}?{_redact_query(query)}{h}{fragment}"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (see :func:`redact`): for error messages that quote URLs."""
    return _URL.sub(lambda m: redact(m.group(0)), text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URLs in each record's message before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


log.addFilter(RedactingFilter())


def url_of(fs: AbstractFileSystem, path: str) -> str:
    """How to name ``path`` in a message: a local path as is, a remote one as its URL."""
    return path if is_local(fs) else redact(fs.unstrip_protocol(path))


def staging_dir(url: str, staging: str | None = None) -> Path:
    """Local working directory for an output at ``url``: ``staging`` if given, else one per URL in the cache."""
    if staging:
        return Path(staging)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kmim" / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


def list_sizes(fs: AbstractFileSystem, root: str) -> dict[str, int]:
    """``{name: size in bytes}`` of the files directly under ``root`` (empty if it does not exist), read fresh."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in entries if e["type"] == "file"}


def sha256_remote(fs: AbstractFileSystem, path: str) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a stored file, streamed."""
    with fs.open(path, "rb") as f:
        return sha256_stream(f)


def is_transient(error: BaseException) -> bool:
    """Whether a retry of a storage operation may succeed: :func:`kmim.retry.is_io_transient` (connection and
    server-side errors, mismatched uploads: yes; permission, missing-file, full-disk, read-only and other
    client errors: no)."""
    return is_io_transient(error)


def _put_once(local: Path, fs: AbstractFileSystem, path: str, sha256: str, size: int) -> None:
    direct = is_object_store(fs)
    target = path if direct else str(tmp_path(path))
    try:
        if not direct:
            fs.makedirs(fs_parent(fs, path), exist_ok=True)
        fs.put_file(str(local), target)
        got_sha, got_size = sha256_remote(fs, target)
        if (got_sha, got_size) != (sha256, size):
            fs.rm_file(target)
            raise _Mismatch(f"stored {got_size} bytes with sha256 {got_sha[:12]}..., expected {size} bytes with "
                            f"sha256 {sha256[:12]}...")
        if not direct:
            fs.mv(target, path)
    except BaseException:
        if not direct:
            with contextlib.suppress(OSError):
                fs.rm_file(target)
        raise


def put_verified(local: str | os.PathLike, fs: AbstractFileSystem, path: str, *, sha256: str | None = None,
                 size: int | None = None) -> None:
    """Upload the complete local file ``local`` to ``path`` on ``fs``; return once the stored copy matches.

    ``sha256`` / ``size`` (bytes) of the local file are computed when not given. Transient errors and mismatches
    are retried, :data:`UPLOAD_ATTEMPTS` attempts in all with exponential backoff; a mismatched object is deleted.
    Raises :class:`UploadError` naming the file and the URL.
    """
    local = Path(local)
    if sha256 is None or size is None:
        sha256, size = sha256_file(local)
    url = url_of(fs, path)
    policy = RetryPolicy(attempts=UPLOAD_ATTEMPTS, backoff_s=BACKOFF_S, transient=is_transient)
    for attempt in itertools.count(1):
        try:
            _put_once(local, fs, path, sha256, size)
            return
        except Exception as e:  # noqa: BLE001 - classified just below
            if not policy.should_retry(e, attempt):
                raise UploadError(f"upload of {local} to {url} failed after {attempt} attempt(s): "
                                  f"{type(e).__name__}: {e}") from e
            delay = policy.delay(attempt)
            log.warning("upload to %s failed (%s: %s); retrying in %.1fs", url, type(e).__name__, e, delay)
            time.sleep(delay)


def put_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Store ``data`` at ``path`` all-or-nothing and checked, like :func:`put_verified`."""
    with tempfile.TemporaryDirectory(prefix="kmim-put-") as d:
        local = Path(d) / "data"
        local.write_bytes(data)
        put_verified(local, fs, path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def get_file(fs: AbstractFileSystem, path: str, local: Path) -> None:
    """Download ``path`` to ``local``, atomically (a temporary sibling renamed into place)."""
    atomic_write(local, lambda tmp: fs.get_file(path, str(tmp)))
