"""The one exception tree of pykata.

    PykataError                 root; every error pykata raises on purpose
     +-- NotFound               a sandbox, container, process or file does not exist
     +-- AlreadyExists          an id is taken
     +-- InvalidArgument        a request, spec or configuration is wrong
     +-- FailedPrecondition     valid request, wrong state (e.g. start a stopped container)
     +-- PermissionDenied       a policy refuses it (the agent policy, an image signature)
     +-- Unavailable            a peer (VM, agent, containerd) cannot be reached or died
     |    +-- VMLaunchError     the VMM did not start; carries argv, exit code, console tail
     +-- Unimplemented          not supported by this component or hypervisor
     +-- ResourceExhausted      a limit was hit (frame size, memory, slots)
     +-- DeadlineExceeded       a call or wait ran out of time
     +-- Internal               a bug or an unexpected failure

Each kind maps to one gRPC status code (``code``), which the ttRPC layer uses
on the wire; ``from_code`` turns a status back into the right class, so an
error raised in the guest agent surfaces on the host as the same kind.
"""

from __future__ import annotations

from collections.abc import Sequence


class PykataError(Exception):
    """Root of every error pykata raises on purpose."""

    code: int = 2  # grpc UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(PykataError):
    code = 3


class DeadlineExceeded(PykataError):
    code = 4


class NotFound(PykataError):
    code = 5


class AlreadyExists(PykataError):
    code = 6


class PermissionDenied(PykataError):
    code = 7


class ResourceExhausted(PykataError):
    code = 8


class FailedPrecondition(PykataError):
    code = 9


class Unimplemented(PykataError):
    code = 12


class Internal(PykataError):
    code = 13


class Unavailable(PykataError):
    code = 14


class VMLaunchError(Unavailable):
    """The VMM process failed to start or died while booting."""

    def __init__(
        self,
        message: str,
        argv: Sequence[str] = (),
        exit_code: int | None = None,
        console_tail: str = "",
    ) -> None:
        detail = message
        if exit_code is not None:
            detail += f" (exit code {exit_code})"
        tail = console_tail.strip()
        if tail:
            last = tail.splitlines()[-1]
            detail += f"; last output: {last}"
        super().__init__(detail)
        self.argv = list(argv)
        self.exit_code = exit_code
        self.console_tail = console_tail


_BY_CODE: dict[int, type[PykataError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unimplemented,
        Internal,
        Unavailable,
    )
}


def from_code(code: int, message: str) -> PykataError:
    """The exception for a gRPC status code (UNKNOWN and others: PykataError)."""
    cls = _BY_CODE.get(code, PykataError)
    err = cls(message)
    if cls is PykataError:
        err.code = code
    return err
