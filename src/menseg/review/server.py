"""The local review server: the pages of :mod:`menseg.review.site` and the verdict endpoint.

Security, as a tool that opens patient scans on a shared workstation must have it:

- it binds to 127.0.0.1 only (a free port unless one is asked for);
- it answers only requests whose ``Host`` header is the address it printed (``127.0.0.1:PORT``),
  which defeats DNS rebinding;
- it serves only the package's static files and the cases it was given, by case id and volume
  name, never a path taken from the request (no traversal);
- its one write is ``POST /api/verdict`` (JSON only, same origin), which updates ``PRED/review.csv``.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from menseg.errors import MensegError
from menseg.review.site import ReviewSite
from menseg.review.verdicts import MAX_NOTE, VERDICTS, read_verdicts, save_verdict

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Largest verdict request body accepted (bytes).
MAX_BODY = 64 * 1024
TEXT = "text/plain; charset=utf-8"


class ReviewServer(ThreadingHTTPServer):
    """A threading HTTP server over one :class:`ReviewSite`, bound to 127.0.0.1."""

    daemon_threads = True

    def __init__(self, site: ReviewSite, port: int = 0) -> None:
        self.site = site
        try:
            super().__init__((HOST, port), _Handler)
        except OSError as e:
            raise MensegError(f"cannot listen on {HOST}:{port} ({e.strerror or e})") from None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def host_header(self) -> str:
        return f"{HOST}:{self.port}"

    def start_background(self) -> threading.Thread:
        """Serve from a daemon thread (tests, notebooks); stop with ``shutdown()``."""
        t = threading.Thread(target=self.serve_forever, name="menseg-review", daemon=True)
        t.start()
        return t


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # -- helpers --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-cache") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", "no-store")

    def _allowed(self) -> bool:
        if self.headers.get("Host") != self.server.host_header:
            self._send(HTTPStatus.FORBIDDEN, b"refused: Host header is not this server's address\n",
                       TEXT)
            return False
        return True

    # -- methods --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._allowed():
            return
        path = unquote(urlsplit(self.path).path)
        if path == "/api/verdicts":
            try:
                return self._json(HTTPStatus.OK, read_verdicts(self.server.site.pred_dir))
            except MensegError as e:
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)})
        try:
            found = self.server.site.get(path)
        except MensegError as e:
            return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"{e}\n".encode(), TEXT)
        if found is None:
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", TEXT)
        self._send(HTTPStatus.OK, *found)

    do_HEAD = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        if unquote(urlsplit(self.path).path) != "/api/verdict":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "the only write is POST /api/verdict"})
        origin = self.headers.get("Origin")
        if origin is not None and origin != self.server.url.rstrip("/"):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "cross-origin write refused"})
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON"})
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"body must be 1 to {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length))
            case, verdict, note = body["case"], body["verdict"], body.get("note", "")
            if not all(isinstance(v, str) for v in (case, verdict, note)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "expected {case, verdict, note} strings"})
        if case not in self.server.site.cases:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no case {case!r} in this review"})
        if verdict not in VERDICTS or len(note) > MAX_NOTE:
            why = f"verdict must be one of {', '.join(VERDICTS)} and the note at most {MAX_NOTE} characters"
            return self._json(HTTPStatus.BAD_REQUEST, {"error": why})
        try:
            row = save_verdict(self.server.site.pred_dir, case, verdict, note)
        except MensegError as e:  # the folder cannot be written
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)})
        log.info("%s: %s%s", case, verdict, f" ({note})" if note else "")
        self._json(HTTPStatus.OK, row)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", TEXT)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815
