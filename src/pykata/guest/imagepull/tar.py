"""A streaming tar reader (ustar, GNU long names, PAX), because the guest
image has no ``tarfile``.

``entries(stream)`` yields one ``Entry`` per member; the caller must consume
or skip its data (``Entry.data``) before asking for the next one. Every
header is checksummed, numbers are octal or base-256, names and link
targets are bounded (PATH_MAX), PAX records are bounded, and sparse files
or unknown types are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from pykata import errors

BLOCK = 512
MAX_NAME = 4096
MAX_PAX = 1024 * 1024
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to chown
MAX_MTIME = float(1 << 40)
MAX_DEV = 0xFFFFFFFF

REG, LNK, SYM, CHR, BLK, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"
_KNOWN = {REG, LNK, SYM, CHR, BLK, DIR, FIFO}


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class TarError(errors.InvalidArgument):
    """The layer is not a tar this reader accepts."""


@dataclass
class Entry:
    name: str
    type: str  # one of REG LNK SYM CHR BLK DIR FIFO
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    linkname: str
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    _reader: TarReader | None = None
    _left: int = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the member's data; b"" at its end."""
        if self._reader is None or not self._left:
            return b""
        data = self._reader.read_some(min(n, self._left))
        self._left -= len(data)
        return data


class _Stream:
    def __init__(self, src: Readable) -> None:
        self.src = src
        self.buf = bytearray()

    def read_some(self, n: int) -> bytes:
        if self.buf:
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out
        data = self.src.read(n)
        if not data:
            raise TarError("layer tar is truncated")
        if len(data) > n:  # a source that gave more than asked
            self.buf += data[n:]
            data = data[:n]
        return data

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self.buf:
                take = min(n - len(out), len(self.buf))
                out += self.buf[:take]
                del self.buf[:take]
                continue
            data = self.src.read(n - len(out))
            if not data:
                if not out and n == BLOCK:
                    return b""
                raise TarError("layer tar is truncated")
            out += data
        if len(out) > n:
            self.buf[:0] = out[n:]
            del out[n:]
        return bytes(out)

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read_some(min(n, 1024 * 1024)))


def _number(field_: bytes, what: str) -> int:
    if field_ and field_[0] & 0x80:  # base-256 (GNU): big-endian, top bit set
        if field_[0] == 0xFF:
            raise TarError(f"negative {what} in a tar header")
        value = field_[0] & 0x7F
        for b in field_[1:]:
            value = (value << 8) | b
        return value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"bad {what} {text[:20]!r} in a tar header") from None


def _text(field_: bytes) -> str:
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum((b - 256 if b > 127 else b) for b in block[:148] + block[156:]) + 8 * 32
    return stored in (unsigned, signed)


def _pax(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise TarError("bad PAX record (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("bad PAX record length") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise TarError("bad PAX record (length does not fit)")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise TarError("bad PAX record (no '=')")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return out


class TarReader:
    def __init__(self, src: Readable) -> None:
        self._s = _Stream(src)
        self._pending: Entry | None = None

    def read_some(self, n: int) -> bytes:
        return self._s.read_some(n)

    def _finish(self) -> None:
        e = self._pending
        if e is not None:
            self._s.skip(e._left)
            e._left = 0
            self._s.skip(-e.size % BLOCK)
            self._pending = None

    def _long(self, size: int, what: str) -> bytes:
        limit = MAX_PAX if what == "PAX header" else MAX_NAME + 1
        if size > limit:
            raise TarError(f"{what} of {size} bytes (at most {limit})")
        data = self._s.read_exact(size)
        if len(data) != size:
            raise TarError("layer tar is truncated")
        self._s.skip(-size % BLOCK)
        return data

    def __iter__(self) -> Iterator[Entry]:
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        pax_bytes = 0
        while True:
            self._finish()
            block = self._s.read_exact(BLOCK)
            if not block or block == b"\0" * BLOCK:
                return  # end of archive (one zero block then EOF is accepted too)
            if not _checksum_ok(block):
                raise TarError("tar header checksum mismatch")
            kind = chr(block[156]) if block[156] else REG
            size = _number(block[124:136], "size")
            if kind == "x":
                pax_bytes += size
                if pax_bytes > MAX_PAX:
                    raise TarError(f"PAX headers of more than {MAX_PAX} bytes for one entry")
                pax.update(_pax(self._long(size, "PAX header")))
                continue
            if kind == "g":
                self._long(size, "PAX header")  # global headers: nothing we apply
                continue
            if kind == "L":
                long_name = _text(self._long(size, "GNU long name"))
                continue
            if kind == "K":
                long_link = _text(self._long(size, "GNU long link"))
                continue
            if kind == "7":
                kind = REG
            if kind not in _KNOWN:
                raise TarError(f"unsupported tar entry type {kind!r}")
            name = _text(block[0:100])
            if block[257:263] == b"ustar\0" and block[345]:  # POSIX prefix (not GNU's)
                name = _text(block[345:500]) + "/" + name
            linkname = _text(block[157:257])
            name = long_name if long_name is not None else name
            linkname = long_link if long_link is not None else linkname
            uid = _number(block[108:116], "uid")
            gid = _number(block[116:124], "gid")
            mtime: float = min(_number(block[136:148], "mtime"), MAX_MTIME)
            xattrs: dict[str, bytes] = {}
            for key, value in pax.items():
                if key == "path":
                    name = value.decode("utf-8", "surrogateescape")
                elif key == "linkpath":
                    linkname = value.decode("utf-8", "surrogateescape")
                elif key in ("size", "uid", "gid"):
                    if not value.isdigit():
                        raise TarError(f"bad PAX {key} {value[:20]!r}")
                    if key == "size":
                        size = int(value)
                    elif key == "uid":
                        uid = int(value)
                    else:
                        gid = int(value)
                elif key == "mtime":
                    try:
                        mtime = min(max(float(value), 0.0), MAX_MTIME)
                    except ValueError:
                        raise TarError(f"bad PAX mtime {value[:20]!r}") from None
                    if mtime != mtime:  # NaN
                        raise TarError("bad PAX mtime")
                elif key.startswith("SCHILY.xattr."):
                    xattrs[key[len("SCHILY.xattr."):]] = value
                elif key.startswith("GNU.sparse."):
                    raise TarError("sparse tar entries are not supported")
            pax, long_name, long_link, pax_bytes = {}, None, None, 0
            if uid > MAX_ID or gid > MAX_ID:
                raise TarError(f"tar entry {name[:200]!r}: uid/gid out of range")
            if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME \
                    or len(linkname.encode("utf-8", "surrogateescape")) > MAX_NAME:
                raise TarError(f"tar entry name longer than {MAX_NAME} bytes")
            if "\0" in name or "\0" in linkname or not name:
                raise TarError("tar entry with an empty name or a NUL in it")
            if kind != REG:
                size = 0  # as tar itself: only regular files carry data
            major, minor = _number(block[329:337], "devmajor"), _number(block[337:345], "devminor")
            if kind in (CHR, BLK) and (major > MAX_DEV or minor > MAX_DEV):
                raise TarError(f"tar entry {name[:200]!r}: device number out of range")
            entry = Entry(name, kind, _number(block[100:108], "mode") & 0o7777, uid, gid,
                          size, mtime, linkname,
                          major, minor,
                          xattrs, self, size)
            self._pending = entry
            yield entry
