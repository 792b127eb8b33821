"""The one retry policy: which errors deserve another try, how many tries in all, how long to wait between them.

Three loops use it: checked uploads (:func:`kmim.storage.put_verified`: 4 tries, exponential backoff) and the
runners' in-process and Ray loops (:mod:`kmim.pipeline.runners`: ``task_retries + 1`` tries of a whole shard,
no wait). The judgement of an error:

- :func:`is_io_transient`: a storage or network error that a retry may heal (a connection reset, a timeout, a
  5xx or throttling response, a mismatched upload), not one that a retry only repeats (a full disk, a
  read-only filesystem, an exhausted quota, a missing file, a denied permission, any other 4xx).
- :func:`is_transient`: a shard's judgement, that or a device error: memory pressure (``MemoryError``, CUDA
  out of memory) or a CUDA error (:func:`is_cuda_error`; the runner retires the process that raised it).
  Any other exception is deterministic (bad input, a bug) and never retried.

Uploads judge by :func:`is_io_transient` alone: an upload is retried for its I/O, and a shard whose upload
failed for good is not retried again (:class:`kmim.storage.UploadError` is deliberately not an ``OSError``).

Not tenacity: tenacity drives one call in a blocking loop (call, sleep, call again). The Ray runner has many
items in flight and one driver loop that waits for whichever finishes first and puts a failed item back in
the queue; it must neither block on one item nor sleep. So the policy only answers questions
(:meth:`RetryPolicy.should_retry`, :meth:`RetryPolicy.delay`) and each loop keeps its own shape.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

# S3 error codes of throttling and server-side trouble (some come with a 4xx status).
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                        "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"})
_PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
# Full disks, read-only filesystems and exhausted quotas do not heal by retrying.
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOENT,
                               errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG})
try:  # botocore's connection errors (EndpointConnectionError, ReadTimeoutError...) are not OSErrors
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import HTTPClientError as _BotoHTTPError

    _TRANSIENT: tuple[type[BaseException], ...] = (OSError, _BotoHTTPError, _BotoConnectionError)
except ImportError:
    _TRANSIENT = (OSError,)


def is_io_transient(error: BaseException) -> bool:
    """Whether a retry may succeed: yes for connection and server-side errors (5xx, throttling) and mismatched
    uploads; no for permission, missing-file, full-disk, read-only and other client (4xx) errors."""
    for e in (error, error.__cause__):  # s3fs raises OSErrors caused by botocore's ClientError
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status == 429 or response["Error"].get("Code") in _THROTTLED
    return (isinstance(error, _TRANSIENT) and not isinstance(error, _PERMANENT)
            and getattr(error, "errno", None) not in _PERMANENT_ERRNOS)


def is_cuda_error(error: BaseException) -> bool:
    """A CUDA error other than out-of-memory: the process's CUDA context may be broken for good, so the actor
    that raised it is retired and its item retried on a fresh one."""
    import torch  # here, not at the top: uploads use this module and need no torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    cuda_message = isinstance(error, RuntimeError) and str(error).startswith(("CUDA error", "CUDA driver error"))
    return isinstance(error, torch.AcceleratorError) or cuda_message


def is_transient(error: BaseException) -> bool:
    """Whether a shard's error may pass on retry: memory and CUDA errors, and I/O errors as
    :func:`is_io_transient` judges them."""
    import torch

    memory = isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError))
    return memory or is_cuda_error(error) or is_io_transient(error)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all (the first included) of errors that ``transient`` judges worth another one;
    the wait after failed try ``n`` (1-based) is ``backoff_s * 2**(n - 1)`` seconds."""

    attempts: int
    backoff_s: float = 0.0
    transient: Callable[[BaseException], bool] = is_transient

    def has_attempts_left(self, attempt: int) -> bool:
        """Whether another try may follow try number ``attempt`` (1-based)."""
        return attempt < self.attempts

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether to try again after try number ``attempt`` (1-based) failed with ``error``."""
        return self.has_attempts_left(attempt) and self.transient(error)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after try number ``attempt`` (1-based) failed, before the next one."""
        return self.backoff_s * 2 ** (attempt - 1)
