"""A verified layer blob as a stream of uncompressed tar bytes.

The compression is taken from the blob's first bytes (and must agree with
the descriptor's media type): gzip with ``zlib`` (built into the guest's
Python), zstd with the system's ``libzstd.so.1`` through ctypes (the guest
image ships it for crun's libraries) or else a ``zstd`` binary, plain tar as
is. The output is hashed (the config's ``diff_id``) and bounded: a layer
inflating past ``limit`` bytes is ResourceExhausted.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import zlib
from typing import BinaryIO

from pykata import errors

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 256 * 1024


def sniff(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


class _Buffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _LibZstd:
    """The streaming decompressor of libzstd (ZSTD_decompressStream)."""

    _lib: ctypes.CDLL | None = None

    @classmethod
    def load(cls) -> ctypes.CDLL | None:
        if cls._lib is None:
            try:
                lib = ctypes.CDLL("libzstd.so.1")
            except OSError:
                return None
            lib.ZSTD_createDStream.restype = ctypes.c_void_p
            lib.ZSTD_freeDStream.argtypes = [ctypes.c_void_p]
            lib.ZSTD_initDStream.argtypes = [ctypes.c_void_p]
            lib.ZSTD_initDStream.restype = ctypes.c_size_t
            lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffer),
                                                  ctypes.POINTER(_Buffer)]
            lib.ZSTD_decompressStream.restype = ctypes.c_size_t
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
            lib.ZSTD_getErrorName.restype = ctypes.c_char_p
            cls._lib = lib
        return cls._lib

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.ds = lib.ZSTD_createDStream()
        if not self.ds:
            raise errors.ResourceExhausted("libzstd: cannot create a decompression stream")
        self._check(lib.ZSTD_initDStream(self.ds))
        self.out = ctypes.create_string_buffer(CHUNK)
        self.pending = b""
        self.pos = 0
        self.last = 0  # the last return value: 0 when a frame is complete
        self.more = False

    def _check(self, rc: int) -> int:
        if self.lib.ZSTD_isError(rc):
            name = self.lib.ZSTD_getErrorName(rc)
            raise errors.InvalidArgument(
                f"zstd layer: {name.decode(errors='replace') if name else rc}")
        return rc

    def feed(self, data: bytes) -> None:
        self.pending, self.pos = data, 0

    def needs_input(self) -> bool:
        return self.pos >= len(self.pending)

    def step(self) -> bytes:
        src = ctypes.create_string_buffer(self.pending[self.pos:], len(self.pending) - self.pos)
        inb = _Buffer(ctypes.cast(src, ctypes.c_void_p), len(self.pending) - self.pos, 0)
        outb = _Buffer(ctypes.cast(self.out, ctypes.c_void_p), CHUNK, 0)
        self.last = self._check(self.lib.ZSTD_decompressStream(
            self.ds, ctypes.byref(outb), ctypes.byref(inb)))
        self.pos += inb.pos
        return self.out.raw[:outb.pos]

    def close(self) -> None:
        if self.ds:
            self.lib.ZSTD_freeDStream(self.ds)
            self.ds = None


class LayerStream:
    """``read(n)``: uncompressed bytes of one blob file; ``close()`` when done."""

    def __init__(self, path: str, limit: int, what: str) -> None:
        self.what = what
        self.limit = limit
        self.total = 0
        self.sha = hashlib.sha256()
        self.f: BinaryIO = open(path, "rb")  # closed by close()
        head = self.f.read(4)
        self.f.seek(0)
        self.kind = sniff(head)
        self._gz: zlib._Decompress | None = None
        self._zstd: _LibZstd | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._eof = False
        self._tail = b""
        self._left = b""  # zstd output not read yet
        if self.kind == "gzip":
            self._gz = zlib.decompressobj(wbits=31)
        elif self.kind == "zstd":
            lib = _LibZstd.load()
            if lib is not None:
                self._zstd = _LibZstd(lib)
            elif (exe := shutil.which("zstd")) is not None:
                self._proc = subprocess.Popen([exe, "-dcq"], stdin=self.f, stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL)
            else:
                self.f.close()
                raise errors.Unimplemented(
                    f"{what}: zstd layers need libzstd.so.1 or a zstd binary in the guest")

    def _count(self, data: bytes) -> bytes:
        self.total += len(data)
        if self.total > self.limit:
            raise errors.ResourceExhausted(
                f"{self.what}: more than {self.limit} bytes once decompressed")
        self.sha.update(data)
        return data

    def read(self, n: int) -> bytes:
        n = max(1, min(n, CHUNK))
        if self.kind == "tar":
            return self._count(self.f.read(n))
        if self._proc is not None:
            assert self._proc.stdout is not None
            data = self._proc.stdout.read(n)
            if not data:
                if self._proc.wait() != 0:
                    raise errors.InvalidArgument(f"{self.what}: zstd failed to decompress it")
            return self._count(data)
        if self._zstd is not None:
            if not self._left:
                self._left = self._read_zstd()
            out, self._left = self._left[:n], self._left[n:]
            return self._count(out)
        return self._count(self._read_gzip(n))

    def _read_gzip(self, n: int) -> bytes:
        gz = self._gz
        assert gz is not None
        while not self._eof:
            if gz.eof:  # a next gzip member, or the end
                rest = gz.unused_data
                if not rest:
                    rest = self.f.read(CHUNK)
                if not rest or not rest.strip(b"\0"):
                    self._eof = True
                    break
                gz = self._gz = zlib.decompressobj(wbits=31)
                self._tail = rest
            data = self._tail or self.f.read(CHUNK)
            self._tail = b""
            if not data:
                raise errors.InvalidArgument(f"{self.what}: gzip stream is truncated")
            try:
                out = gz.decompress(data, n)
            except zlib.error as e:
                raise errors.InvalidArgument(f"{self.what}: bad gzip data: {e}") from None
            self._tail = gz.unconsumed_tail
            if out:
                return out
        return b""

    def _read_zstd(self) -> bytes:
        z = self._zstd
        assert z is not None
        while True:
            if z.needs_input() and not z.more:
                data = self.f.read(CHUNK)
                if not data:
                    if z.last != 0:
                        raise errors.InvalidArgument(f"{self.what}: zstd stream is truncated")
                    return b""
                z.feed(data)
            out = z.step()
            z.more = len(out) == CHUNK  # a full buffer: more may come without input
            if out:
                return out

    def close(self) -> None:
        if self._zstd is not None:
            self._zstd.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        self.f.close()

    def diff_id(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def drain(stream: LayerStream) -> None:
    """Read to the end (tar padding after the end-of-archive blocks is hashed too)."""
    while stream.read(CHUNK):
        pass


