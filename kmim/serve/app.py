"""The ASGI application of ``kmim serve`` (Starlette): read-only, GET and HEAD only.

Routes: ``/`` (and ``/index.html``) the report's page, ``/NAME.png`` the PNGs that page names, ``/data/NAME`` the
dataset's manifest-listed files. Any other path, a directory, or a listed local file that is no longer a regular
file of its size: 404. Another method: 405. With a token, a request without ``Authorization: Bearer <token>``:
401, before anything else is looked at.

Responses carry ``ETag`` (the quoted sha256), ``Accept-Ranges: bytes`` and the file's content type; a GET with one
byte range gets 206 with ``Content-Range`` (416 when unsatisfiable, ``If-Range`` honoured); ``If-None-Match``
with the file's ETag or ``*`` gets 304.
"""

from __future__ import annotations

import hmac
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kmim.serve.files import REPORT_INDEX, FileTable, NotServable, ServedFile
from kmim.serve.ranges import Unsatisfiable, byte_range

log = logging.getLogger("kmim")

METHODS = ("GET", "HEAD")
DATA_MOUNT = "/data/"
# The report is self-contained: it may load its own images and inline styles and scripts, nothing from elsewhere.
_POLICY = ("default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
           "script-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON = {"cache-control": "no-cache", "x-content-type-options": "nosniff", "content-security-policy": _POLICY,
           "referrer-policy": "no-referrer"}


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant time)."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


def etag_matches(header: str | None, f: ServedFile) -> bool:
    """Whether an ``If-None-Match`` header names ``f``'s ETag (weak comparison) or is ``*``."""
    if header is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or f.etag in (tag.removeprefix("W/") for tag in tags)


def _span(request: Request, f: ServedFile) -> tuple[int, int] | None:
    """The byte span a GET asks for, or None for the whole file (no or ignored Range, or a stale ``If-Range``);
    raises :class:`~kmim.serve.ranges.Unsatisfiable`. Range is defined for GET only (RFC 9110)."""
    if request.method != "GET":
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != f.etag:
        return None
    return byte_range(request.headers.get("range"), f.size)


def file_response(request: Request, table: FileTable, f: ServedFile) -> Response:
    """The answer to a GET or HEAD of ``f``: 304, 416, 206 or 200, the body streamed from ``table``."""
    headers = {**_COMMON, "etag": f.etag, "accept-ranges": "bytes"}
    if etag_matches(request.headers.get("if-none-match"), f):
        return Response(status_code=304, headers=headers)
    try:
        span = _span(request, f)
    except Unsatisfiable:
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{f.size}"})
    start, stop = span or (0, f.size)
    headers.update({"content-type": f.content_type, "content-length": str(stop - start)})
    if span is not None:
        headers["content-range"] = f"bytes {start}-{stop - 1}/{f.size}"
    status = 200 if span is None else 206
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(table.chunks(f, start, stop), status_code=status, headers=headers)


class Files:
    """The one endpoint: every path and method is answered here, by table look-up only."""

    def __init__(self, data: FileTable, report: FileTable, token: str | None):
        self.data, self.report, self.token = data, report, token

    def lookup(self, path: str) -> tuple[FileTable, ServedFile | None]:
        """The table and file a decoded request path names (None: nothing)."""
        if path.startswith(DATA_MOUNT):
            return self.data, self.data.get(path[len(DATA_MOUNT):])
        return self.report, self.report.get(REPORT_INDEX if path == "/" else path[1:])

    def respond(self, request: Request) -> Response:
        """Auth, then method, then look-up, then the file's response."""
        if self.token is not None and not authorized(request.headers.get("authorization"), self.token):
            return PlainTextResponse("unauthorized\n", 401, headers={"www-authenticate": 'Bearer realm="kmim"'})
        if request.method not in METHODS:
            return PlainTextResponse("method not allowed\n", 405, headers={"allow": ", ".join(METHODS)})
        # scope["path"], not request.url.path: the URL is re-parsed, so a decoded '?' there would cut a suffix off.
        table, f = self.lookup(request.scope["path"])
        if f is None:
            return PlainTextResponse("not found\n", 404)
        try:
            table.check(f)
        except NotServable as e:
            log.warning("not serving %s: %s", f.name, e)
            return PlainTextResponse("not found\n", 404)
        return file_response(request, table, f)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await run_in_threadpool(self.respond, request)
        await response(scope, receive, send)


def create_app(data: FileTable, report: FileTable, token: str | None = None) -> Starlette:
    """The application serving ``data`` under ``/data/`` and ``report`` at ``/``; every request needs
    ``Authorization: Bearer <token>`` when ``token`` is given."""
    return Starlette(routes=[Route("/{path:path}", Files(data, report, token))])
