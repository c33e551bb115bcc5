"""gRPC status codes as ttRPC carries them, and their mapping to pykata errors."""

from __future__ import annotations

from pykata import errors
from pykata.protos import ttrpc_pb2

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14


# A status message is one line of at most this many characters.
MAX_MESSAGE = 4096


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one printable line: runs of white space (line breaks too) become
    one space, other control characters their escape; cut at ``limit``."""
    if not text.isprintable() or len(text) > limit:
        text = " ".join(text.split())
        if not text.isprintable():
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        if len(text) > limit:
            text = text[:limit] + f"...(+{len(text) - limit} characters)"
    return text


def to_status(exc: BaseException) -> ttrpc_pb2.Status:
    """The one place an exception becomes a wire status (its message one line)."""
    if isinstance(exc, errors.PykataError):
        return ttrpc_pb2.Status(code=exc.code, message=one_line(exc.message))
    return ttrpc_pb2.Status(code=UNKNOWN, message=one_line(f"{type(exc).__name__}: {exc}"))


def to_error(status: ttrpc_pb2.Status) -> errors.PykataError:
    return errors.from_code(status.code, status.message)
