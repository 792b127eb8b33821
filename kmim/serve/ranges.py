"""HTTP ``Range`` headers (RFC 9110, section 14): one byte range, as a half-open span of a file."""

from __future__ import annotations

import re

_SPEC = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


class Unsatisfiable(ValueError):
    """A well-formed range that selects no byte of the file: answered with 416."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The span ``(start, stop)`` (stop exclusive) that ``header`` selects in a file of ``size`` bytes, or None to
    send the whole file.

    One range ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` (the last n bytes) is served; an end past the file is
    clipped. None (the whole file, which RFC 9110 allows a server to answer any range with) for no header,
    an invalid one (another unit, ``b < a``, neither bound) and for several ranges: multipart responses are not
    built. Raises :class:`Unsatisfiable` when the range starts at or past the end, or asks for the last 0 bytes.
    """
    if header is None or "," in header:
        return None
    match = _SPEC.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable(f"bytes=-{suffix} of {size} bytes")
        return max(0, size - suffix), size
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable(f"bytes={start}- of {size} bytes")
    return start, size if last == "" else min(int(last) + 1, size)
