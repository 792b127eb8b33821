"""One ``kmim run`` at a time per output: a lock on a local directory, a lease in an object-store prefix.

Two runs on one output corrupt each other: the second one's start-up sweep deletes the first one's in-flight
temporary files, and both pass the job.json check, tokenize the same shards and write the manifest.
:func:`hold_output` is held for the whole job, taken before anything in the output is read or changed; a second
run fails at once with a :class:`LockError` naming the holder (pid, host, since when, command). Neither file is
part of the dataset: publish copies only the files the manifest lists, verify reads only those, and the job
deletes its lock or lease when it ends. The holder record never holds storage option values or URL passwords.

**A local directory** (anything fsspec serves as a local path): ``fcntl.flock`` on ``.kmim.lock`` in it, its
content the holder record (for messages only). The kernel drops a flock when its holder dies, SIGKILL included,
so a crashed run's lock is taken over at once by the next run. The file is unlinked (while still locked) on
release; a process that opened it just before then sees, once it gets the lock, that the path now names another
inode, and locks the new file instead. Protects against any other process on this host, and against processes on
other hosts where the filesystem shares flocks between its clients (NFSv4, or Lustre/GPFS/CephFS with flock
enabled). Does not protect: NFS mounted with ``local_lock=flock``/``local_lock=all``/``nolock``, or any
filesystem whose flocks are per client (two hosts both get the lock); a filesystem with no flock at all
(ENOLCK, EOPNOTSUPP: e.g. NFSv3 without a lock manager), where the run logs a warning and goes on unlocked; a
child process forked without exec shares the lock and keeps it alive after the job process dies.

**Any other filesystem** (S3, GCS, ...): a lease object ``.kmim.lease`` in the output prefix, JSON with the holder
record plus ``renewed`` (Unix time, seconds), ``ttl_s`` and a random ``token``. It is created with
``pipe_file(mode="create")``, a conditional write where the filesystem has one (s3fs: ``If-None-Match: *``),
rewritten by a daemon thread every ``ttl_s / 3`` seconds, and deleted at the end. A lease is stale, and taken
over, when it was not renewed for its own ``ttl_s`` (:data:`LEASE_TTL_S`, or the ``KMIM_LEASE_TTL_S``
environment variable of the run that wrote it), or at once when its holder was on this host and its pid is gone
(a crashed run's rerun proceeds). On S3 a takeover or renewal is a PUT ``If-Match`` the ETag read, so of two
runs taking over one stale lease only one wins, and a holder whose lease was taken over notices it. Does not
protect:

* filesystems without conditional writes: fsspec's ``mode="create"`` there is check-then-write, and takeover and
  renewal are read-then-write, so two runs starting within one round trip of each other may both win;
* clock skew: a lease's age is the reader's clock minus the holder's ``renewed`` time; a reader whose clock runs
  ahead of the holder's by more than ``ttl_s`` takes over a live lease;
* a holder paused for longer than ``ttl_s`` (suspended VM, SIGSTOP, network partition) loses its lease to the
  next run but is not stopped: it logs an error and stops renewing, its in-flight writes (shards, which the new
  holder rewrites or checks) go on; only its commit is refused (``confirm`` reads the lease before the manifest);
* pid reuse: a dead holder's pid taken by another process on the same host keeps its lease alive until ``ttl_s``;
* the release reads the lease back and deletes it if it is still its own, without a condition on the delete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fsspec import AbstractFileSystem

from kmim.storage import is_local, is_object_store, join, redact, url_of

log = logging.getLogger("kmim")

LOCK_FILE = ".kmim.lock"
LEASE_FILE = ".kmim.lease"
LEASE_TTL_S = 600.0  # seconds without renewal after which a lease is stale; KMIM_LEASE_TTL_S overrides
_TAKE_ATTEMPTS = 3
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # e.g. NFS without a lock manager


class LockError(RuntimeError):
    """The output is held by another live run; the message names it."""


@contextmanager
def hold_output(fs: AbstractFileSystem, root: str) -> Iterator[Callable[[], None]]:
    """Hold the output at ``root`` on ``fs`` exclusively for the duration of the block (see the module docstring).

    Raises :class:`LockError` at once, naming the holder, when another live run holds it. Yields ``confirm``:
    call it right before committing; it raises :class:`LockError` when this run no longer holds the output (its
    lease was taken over while it was paused), so a run that lost its lease never writes the manifest.
    """
    if is_local(fs):
        with _flock(Path(root)):
            yield lambda: None  # the kernel holds a flock until this process ends
    else:
        with _lease(fs, root) as confirm:
            yield confirm


def _command() -> str:
    """This process's command line, with storage option values (credentials) and URL passwords hidden."""
    flag, out = "--storage-option", []
    for prev, arg in zip(["", *sys.argv], sys.argv, strict=False):
        if prev == flag:
            arg = arg.partition("=")[0] + "=***"
        elif arg.startswith(flag + "="):
            arg = f"{flag}={arg[len(flag) + 1:].partition('=')[0]}=***"
        out.append(redact(arg))
    return " ".join(out)


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _who(record: dict) -> str:
    """The holder in words: pid, host, since when, command."""
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since {record.get('since', '?')} "
            f"({record.get('command', 'command unknown')})")


def _parse(data: bytes) -> dict:
    """A holder record or lease; {} for an empty or unreadable one."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _locked_fd(path: Path) -> int:
    """An open fd of ``path`` holding its exclusive flock; raises LockError naming the holder when it is taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 1 << 16, 0))
            os.close(fd)
            raise LockError(f"{path.parent} is in use by another kmim run: {_who(holder)}; wait for it to end "
                            "or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder unlinked the file between our open and our flock: lock the new one


@contextmanager
def _flock(root: Path) -> Iterator[None]:
    path = root / LOCK_FILE
    try:
        fd = _locked_fd(path)
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        log.warning("%s: this filesystem has no flock (%s); running unlocked, so another run on this output "
                    "would go undetected", root, e.strerror)
        yield
        return
    try:
        previous = _parse(os.pread(fd, 1 << 16, 0))
        if previous:  # a clean release unlinks the file, so its holder died
            log.info("%s: taking over the lock of %s, which ended without releasing it", path, _who(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(), sort_keys=True).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: see _locked_fd
        os.close(fd)


def _is_s3(fs: AbstractFileSystem) -> bool:
    return "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def _read_lease(fs: AbstractFileSystem, path: str) -> tuple[dict | None, str | None]:
    """(the lease at ``path``, its ETag on S3 else None); (None, None) when there is none."""
    fs.invalidate_cache(path)
    try:
        tag = fs.info(path).get("ETag") if _is_s3(fs) else None
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return _parse(data), tag


def _put_lease(fs: AbstractFileSystem, path: str, lease: dict, tag: str | None) -> None:
    """Overwrite the lease at ``path``; on S3 only if its ETag still is ``tag`` (else an OSError)."""
    fs.pipe_file(path, json.dumps(lease, sort_keys=True).encode(), **({"IfMatch": tag} if tag else {}))


def _conflict(error: OSError) -> bool:
    """Whether a conditional write failed because the object changed (S3 412 PreconditionFailed)."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _seconds(value: object, default: float) -> float:
    """``value`` if it is a finite number (of seconds) as JSON gives it, else ``default``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else default


def _age_ttl(lease: dict) -> tuple[float, float]:
    """(seconds since the lease was renewed, its ttl in seconds); a lease without a valid time is infinitely old."""
    return time.time() - _seconds(lease.get("renewed"), -math.inf), _seconds(lease.get("ttl_s"), LEASE_TTL_S)


def _stale(lease: dict) -> str | None:
    """Why ``lease`` may be taken over, or None while its holder is live."""
    age, ttl = _age_ttl(lease)
    if age > ttl:
        return f"not renewed for {age:.0f}s (its ttl is {ttl:.0f}s)"
    if lease.get("host") == socket.gethostname() and not _pid_alive(lease.get("pid")):
        return f"its pid {lease.get('pid')} is gone from this host"
    return None


def _take_lease(fs: AbstractFileSystem, root: str, path: str, me: dict) -> None:
    where = url_of(fs, path)
    for _ in range(_TAKE_ATTEMPTS):
        me["renewed"] = time.time()
        try:
            fs.pipe_file(path, json.dumps(me, sort_keys=True).encode(), mode="create")
            return
        except FileExistsError:
            pass
        lease, tag = _read_lease(fs, path)
        if lease is None:
            continue  # released since
        why = _stale(lease)
        if why is None:
            age, ttl = _age_ttl(lease)
            raise LockError(f"{url_of(fs, root)} is in use by another kmim run: {_who(lease)}, lease renewed "
                            f"{age:.0f}s ago (stale after {ttl:.0f}s without renewal); wait for it to end or use "
                            "another --out")
        log.warning("%s: taking over the lease of %s: %s", where, _who(lease), why)
        try:
            _put_lease(fs, path, me, tag)
            return
        except OSError as e:
            if not _conflict(e):
                raise
    raise LockError(f"{where}: other runs keep taking this lease; retry")


def _renew(fs: AbstractFileSystem, path: str, me: dict, stop: threading.Event) -> None:
    """Rewrite the lease every ttl_s / 3 seconds until ``stop``; give up, logging an error, once it is not ours."""
    where = url_of(fs, path)
    while not stop.wait(me["ttl_s"] / 3):
        try:
            lease, tag = _read_lease(fs, path)
            if lease is None or lease.get("token") != me["token"]:
                log.error("%s: this run lost its lease (now %s); another run may write to the output", where,
                          _who(lease) if lease else "deleted")
                return
            me["renewed"] = time.time()
            _put_lease(fs, path, me, tag)
        except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next tick
            log.warning("%s: renewing the lease failed (%s: %s); retrying", where, type(e).__name__, e)


def _ttl_s() -> float:
    """The lease TTL in seconds: ``KMIM_LEASE_TTL_S`` if set, else :data:`LEASE_TTL_S`."""
    value = os.environ.get("KMIM_LEASE_TTL_S", str(LEASE_TTL_S))
    try:
        ttl = float(value)
    except ValueError:
        ttl = 0.0
    if not 0 < ttl < math.inf:
        raise ValueError(f"KMIM_LEASE_TTL_S={value!r} is not a positive number of seconds")
    return ttl


@contextmanager
def _lease(fs: AbstractFileSystem, root: str) -> Iterator[Callable[[], None]]:
    path = join(root, LEASE_FILE)
    me = {**_holder(), "ttl_s": _ttl_s(), "token": uuid.uuid4().hex}
    if not is_object_store(fs):
        fs.makedirs(root, exist_ok=True)
    _take_lease(fs, root, path, me)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, me, stop), name="kmim-lease", daemon=True)
    renewer.start()

    def confirm() -> None:
        lease, _ = _read_lease(fs, path)
        if lease is None or lease.get("token") != me["token"]:
            raise LockError(f"{url_of(fs, path)}: this run lost its lease (now {_who(lease) if lease else 'deleted'}); "
                            "not committing: rerun once the other run has ended")

    try:
        yield confirm
    finally:
        stop.set()
        renewer.join()
        try:
            lease, _ = _read_lease(fs, path)
            if lease is not None and lease.get("token") == me["token"]:
                fs.rm_file(path)
        except OSError as e:
            log.warning("%s: could not delete the lease (%s); the next run takes it over once stale",
                        url_of(fs, path), e)
