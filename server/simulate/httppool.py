"""Keep-alive HTTP/1.1 connections for the simulated pilots, shared by all of them.

Tornado's ``SimpleAsyncHTTPClient`` opens a new TCP connection for every request: with thousands
of pilots that was a connect, an accept and a close per getJob and updateJob, on both sides of
a 2-core machine, and the simulator measured the connection set-up more than the server. Here
a pool of at most ``size`` persistent connections serves every request in turn (a pilot holds
one for one request only), speaking just the HTTP the server answers: a POST of a form, a
reply with ``Content-Length`` (or chunked), ``Connection: close`` honoured.
"""
from __future__ import annotations

import asyncio
import logging
import urllib.parse

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """A reply other than 200, or a broken connection: the caller may try again."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()

    async def post(self, host: str, path: str, headers: str, body: bytes) -> tuple[bool, bytes]:
        """(keep the connection, reply body); raises HTTPError for any status but 200."""
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await self.reader.readline()
        if not status:
            raise HTTPError("connection closed by the server")
        length, chunked, keep = None, False, True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                keep = False
        if chunked:
            data = bytearray()
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                data += await self.reader.readexactly(size)
                await self.reader.readline()
            data = bytes(data)
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:                                     # no length: the body ends with the stream
            data, keep = await self.reader.read(), False
        parts = status.split(None, 2)
        if len(parts) < 2 or parts[1] != b"200":
            raise HTTPError(f"{status.decode(errors='replace').strip()}: {data[:200]!r}")
        return keep, data


class ConnectionPool:
    """At most ``size`` keep-alive connections to ``url`` (``http://host:port``)."""

    def __init__(self, url: str, size: int = 100, timeout_s: float = 120.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"an http://host:port URL, got {url!r}")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.netloc = parsed.netloc
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(size)
        self.opened = 0                            # connections opened in all (for the log)

    async def post(self, path: str, form: dict, headers: dict[str, str]) -> bytes:
        """POST ``form`` (urlencoded) to ``path``; the reply's body. HTTPError, OSError,
        EOFError, ValueError or asyncio.TimeoutError when it failed (the connection is then
        dropped)."""
        body = urllib.parse.urlencode(form).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + \
            "Content-Type: application/x-www-form-urlencoded\r\n"
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = _Conn(*await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout_s))
                    self.opened += 1
                keep, data = await asyncio.wait_for(
                    conn.post(self.netloc, path, head, body), self.timeout_s)
            except BaseException:                 # failed or cancelled mid-request: the stream
                if conn is not None:              # is in an unknown state
                    conn.close()
                raise
            if keep:
                self._idle.append(conn)
            else:
                conn.close()
            return data

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
