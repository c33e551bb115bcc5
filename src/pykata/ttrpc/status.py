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


def to_status(exc: BaseException) -> ttrpc_pb2.Status:
    """The one place an exception becomes a wire status."""
    if isinstance(exc, errors.PykataError):
        return ttrpc_pb2.Status(code=exc.code, message=exc.message)
    return ttrpc_pb2.Status(code=UNKNOWN, message=f"{type(exc).__name__}: {exc}")


def to_error(status: ttrpc_pb2.Status) -> errors.PykataError:
    return errors.from_code(status.code, status.message)
