"""A small HTTP/1.1 client on asyncio streams, enough for a registry.

The guest image has no ``http`` package (and no ``email``), so the agent
speaks HTTP itself: one request per connection (``Connection: close``),
bodies framed by Content-Length, chunked transfer coding or the end of the
connection. Everything the server sends is bounded: the status line and
headers together (``max_header``), the number of headers, each chunk-size
line, and the body (the caller's ``limit``). TLS needs the ``ssl`` module,
which the guest image does not ship today: an https URL then fails with one
line saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pykata import errors

MAX_HEADER = 64 * 1024
MAX_HEADERS = 128
READ_CHUNK = 256 * 1024
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class URL:
    scheme: str  # http | https
    host: str
    port: int
    target: str  # path and query

    @classmethod
    def parse(cls, url: str) -> URL:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.InvalidArgument(f"unsupported URL {url!r}: http or https with a host")
        if parts.username or parts.password:
            raise errors.InvalidArgument(f"URL {url!r}: credentials in URLs are not accepted")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise errors.InvalidArgument(f"URL {url!r}: {e}") from None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if any(c in target for c in "\r\n \t"):
            raise errors.InvalidArgument(f"URL {url!r}: whitespace in the path")
        return cls(parts.scheme, parts.hostname, port, target)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


@dataclass
class Response:
    url: URL
    status: int
    reason: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _framing: str = "close"  # length | chunked | close | none
    _length: int = 0
    _timeout: float = 60.0  # for each read of the body: a stalled server is an error

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        try:
            return await asyncio.wait_for(reader.read(n), self._timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"{self.url}: no data for {self._timeout:g}s in the body") from None
        except OSError as e:
            raise errors.Unavailable(f"{self.url}: {e.strerror or e}") from None

    async def _body_line(self, reader: asyncio.StreamReader, limit: int) -> bytes:
        try:
            return await asyncio.wait_for(_line(reader, limit, self.url), self._timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"{self.url}: no data for {self._timeout:g}s in the body") from None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        """The body in pieces; more than ``limit`` bytes is ResourceExhausted."""
        reader = self._reader
        if reader is None or self._framing == "none":
            return
        total = 0

        def count(n: int) -> None:
            nonlocal total
            total += n
            if total > limit:
                raise errors.ResourceExhausted(
                    f"{self.url}: response body larger than {limit} bytes")

        if self._framing == "length":
            if self._length > limit:
                raise errors.ResourceExhausted(
                    f"{self.url}: response body of {self._length} bytes, more than {limit}")
            left = self._length
            while left:
                data = await self._read(reader, min(left, READ_CHUNK))
                if not data:
                    raise errors.Unavailable(
                        f"{self.url}: connection closed with {left} bytes of the body missing")
                left -= len(data)
                count(len(data))
                yield data
        elif self._framing == "chunked":
            while True:
                line = await self._body_line(reader, 1024)
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                    if size < 0 or not size_text or size_text.startswith((b"-", b"+")):
                        raise ValueError
                except ValueError:
                    raise errors.Unavailable(
                        f"{self.url}: bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    seen = 0
                    while (trailer := await self._body_line(reader, MAX_HEADER)):
                        seen += len(trailer)
                        if seen > MAX_HEADER:
                            raise errors.Unavailable(f"{self.url}: trailers too large")
                    break
                count(size)
                left = size
                while left:
                    data = await self._read(reader, min(left, READ_CHUNK))
                    if not data:
                        raise errors.Unavailable(f"{self.url}: connection closed inside a chunk")
                    left -= len(data)
                    yield data
                if await self._body_line(reader, 2):
                    raise errors.Unavailable(f"{self.url}: chunk not followed by CRLF")
        else:
            while data := await self._read(reader, READ_CHUNK):
                count(len(data))
                yield data

    async def read(self, limit: int) -> bytes:
        parts = [c async for c in self.chunks(limit)]
        return b"".join(parts)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)


async def _line(reader: asyncio.StreamReader, limit: int, url: URL) -> bytes:
    """One CRLF-terminated line without its end; at most ``limit`` bytes."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise errors.Unavailable(f"{url}: connection closed in the middle of a line") from None
    except asyncio.LimitOverrunError:
        raise errors.Unavailable(f"{url}: line longer than the reader's buffer") from None
    if len(line) > limit + 2:
        raise errors.Unavailable(f"{url}: line longer than {limit} bytes")
    return line.rstrip(b"\r\n")


def _ssl_context(ssl_context: Any) -> Any:
    """The caller's context, else one trusting the image's CA bundle (Debian's path)
    or OpenSSL's default paths."""
    if ssl_context is not None:
        return ssl_context
    try:
        import ssl
    except ImportError:
        raise errors.Unimplemented(
            "https registries need the ssl module (_ssl and libssl3), which this"
            " image does not have") from None
    return ssl.create_default_context(cafile=CA_BUNDLE if os.path.exists(CA_BUNDLE) else None)


async def request(method: str, url: URL, headers: Mapping[str, str] | None = None, *,
                  body: bytes = b"", timeout: float = 60.0, ssl_context: Any = None,
                  max_header: int = MAX_HEADER) -> Response:
    """Send one request and read the status line and headers; the caller reads the
    body (``Response.chunks``) and closes the response."""
    tls = _ssl_context(ssl_context) if url.scheme == "https" else None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            url.host, url.port, ssl=tls, limit=max_header + 4,
            server_hostname=url.host if tls is not None else None), timeout)
    except TimeoutError:
        raise errors.DeadlineExceeded(f"{url}: no connection within {timeout:g}s") from None
    except OSError as e:
        raise errors.Unavailable(f"{url}: cannot connect: {e.strerror or e}") from None
    resp = Response(url, 0, "", _reader=reader, _writer=writer, _timeout=timeout)
    try:
        lines = [f"{method} {url.target} HTTP/1.1", f"Host: {url.authority}",
                 "User-Agent: pykata-agent", "Connection: close"]
        for k, v in (headers or {}).items():
            if any(c in k + v for c in "\r\n"):
                raise errors.InvalidArgument(f"header {k!r}: line breaks are not allowed")
            lines.append(f"{k}: {v}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), timeout)
        await asyncio.wait_for(_read_head(resp, reader, method, max_header), timeout)
    except TimeoutError:
        await resp.close()
        raise errors.DeadlineExceeded(f"{url}: no response within {timeout:g}s") from None
    except OSError as e:
        await resp.close()
        raise errors.Unavailable(f"{url}: {e.strerror or e}") from None
    except BaseException:
        await resp.close()
        raise
    return resp


async def _read_head(resp: Response, reader: asyncio.StreamReader, method: str,
                     max_header: int) -> None:
    url = resp.url
    used = 0
    while True:  # 1xx answers are skipped
        status_line = await _line(reader, max_header, url)
        used += len(status_line)
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() \
                or len(parts[1]) != 3:
            raise errors.Unavailable(f"{url}: not an HTTP/1.x response: {status_line[:60]!r}")
        resp.status = int(parts[1])
        resp.reason = parts[2].decode("latin-1", "replace") if len(parts) > 2 else ""
        resp.headers = {}
        count = 0
        while line := await _line(reader, max_header, url):
            used += len(line)
            count += 1
            if used > max_header or count > MAX_HEADERS:
                raise errors.Unavailable(
                    f"{url}: response head larger than {max_header} bytes or {MAX_HEADERS} lines")
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise errors.Unavailable(f"{url}: bad header line {line[:60]!r}")
            resp.headers.setdefault(name.decode("latin-1").lower(), []).append(
                value.strip().decode("latin-1"))
        if resp.status >= 200 or resp.status == 101:
            break
    te = ",".join(resp.headers.get("transfer-encoding", [])).lower()
    cl = resp.headers.get("content-length", [])
    if method == "HEAD" or resp.status in (204, 304):
        resp._framing = "none"
    elif te:
        if [t.strip() for t in te.split(",")] != ["chunked"]:
            raise errors.Unavailable(f"{url}: unsupported transfer coding {te!r}")
        resp._framing = "chunked"
    elif cl:
        if len(set(cl)) != 1 or not cl[0].isdigit():
            raise errors.Unavailable(f"{url}: bad Content-Length {cl!r}")
        resp._framing, resp._length = "length", int(cl[0])
    else:
        resp._framing = "close"
