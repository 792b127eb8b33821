"""Run ``kmim serve``: build the file tables (and the report, unless one is given), then serve them with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from kmim.serve.app import create_app
from kmim.serve.files import FileTable, ServeError, data_files, report_files
from kmim.storage import redact

log = logging.getLogger("kmim")

GRACEFUL_S = 5  # seconds open responses get to finish on shutdown


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``: serving beyond this machine is an explicit choice."""
    if not (allow_remote or is_loopback(host)):
        raise ServeError(f"--host {host} is not a loopback address: pass --allow-remote to serve beyond this "
                         "machine")


@contextmanager
def report_table(root: str, report: Path | None, storage_options: dict | None) -> Iterator[FileTable]:
    """The report's table: ``report`` (a built report directory) if given, else one built now from the dataset
    into a temporary directory that lives as long as the context."""
    if report is not None:
        yield report_files(report)
        return
    from kmim.report import build_report

    log.info("building the report of %s", redact(root))
    with tempfile.TemporaryDirectory(prefix="kmim-report-") as tmp:
        yield report_files(build_report(root, Path(tmp), storage_options=storage_options).parent)


def make_server(data: FileTable, report: FileTable, token: str | None, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server of the application (not started); its access log shows paths, never headers."""
    config = uvicorn.Config(create_app(data, report, token), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=GRACEFUL_S, server_header=False, proxy_headers=False)
    return uvicorn.Server(config)


def serve(root: str, *, host: str = "127.0.0.1", port: int = 8000, report: Path | None = None,
          token: str | None = None, storage_options: dict | None = None, allow_remote: bool = False) -> None:
    """Serve the dataset at ``root`` under ``/data/`` and its report at ``/`` until interrupted.

    Raises :class:`~kmim.serve.files.ServeError` (a non-loopback host without ``allow_remote``, an empty token, a
    dataset or report that cannot be served) or :class:`~kmim.datasets.manifest.ManifestError` before listening.
    """
    check_host(host, allow_remote)
    if token is not None and not token.strip():
        raise ServeError("the token is empty: give one, or none to serve without")
    data = data_files(root, storage_options)
    with report_table(root, report, storage_options) as pages:
        make_server(data, pages, token, host, port).run()
