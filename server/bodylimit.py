"""Refuse request bodies over the size limit with a reply that says so.

Tornado's own ``max_body_size`` answers an oversized request with a bare "400 Bad Request" and
no reason. This wrapper looks at ``Content-Length`` as soon as the headers arrive, before any of
the body is read, and answers 413 with a JSON body that both kinds of callers understand (the
pilot protocol's ``StatusCode``/``errorDialog`` and the API's ``success``/``message``). Chunked
bodies without a length are still cut off by Tornado's ``max_body_size`` (a plain 400).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from tornado import httputil

log = logging.getLogger(__name__)


class BodyLimit(httputil.HTTPServerConnectionDelegate):
    """Wraps the Tornado application as the HTTP server's delegate."""

    def __init__(self, app: httputil.HTTPServerConnectionDelegate, limit: int):
        self.app = app
        self.limit = limit

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _Guard(self.app.start_request(server_conn, request_conn), request_conn, self.limit)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class _Guard(httputil.HTTPMessageDelegate):
    def __init__(self, inner: httputil.HTTPMessageDelegate, conn: Any, limit: int):
        self.inner, self.conn, self.limit = inner, conn, limit

    def headers_received(self, start_line, headers):
        length = headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.limit:
            return self._refuse(start_line, int(length))
        return self.inner.headers_received(start_line, headers)

    async def _refuse(self, start_line, length: int) -> None:
        reason = (f"request body of {length} bytes is over this server's limit of "
                  f"{self.limit} bytes")
        log.warning("%s %s: %s", getattr(start_line, "method", "?"),
                    getattr(start_line, "path", "?"), reason)
        body = json.dumps({"StatusCode": 30, "errorDialog": reason, "success": False,
                           "message": reason, "data": None}).encode()
        stream = self.conn.detach()       # Tornado stops here: the body is never read
        try:
            await stream.write(b"HTTP/1.1 413 Payload Too Large\r\n"
                               b"Content-Type: application/json\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                               b"Connection: close\r\n\r\n" + body)
        except Exception:  # noqa: BLE001 - the client went away: nothing to tell
            pass
        finally:
            stream.close()

    def data_received(self, chunk: bytes):
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()
