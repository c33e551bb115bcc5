"""W3C trace context (``traceparent``) in ttRPC request metadata: parsed and
formatted here, for the host (which sends it) and the guest agent (which records
its spans under it). The value comes from a peer: anything malformed is no
trace context at all, never an error.

    traceparent: 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KEY = "traceparent"
SAMPLED = 0x01
_HEX = frozenset("0123456789abcdef")
_LENGTH = 55  # version 00: 2+1+32+1+16+1+2
MAX_VALUE = 256  # a longer value (a later version's extra fields) is not looked at


@dataclass(frozen=True)
class TraceParent:
    trace_id: bytes  # 16 bytes, not all zero
    span_id: bytes  # 8 bytes, not all zero: the caller's span
    flags: int = SAMPLED

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def format(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{self.flags:02x}"


def _hex(text: str, size: int) -> bytes | None:
    if len(text) != 2 * size or not _HEX.issuperset(text):
        return None
    raw = bytes.fromhex(text)
    return raw if any(raw) else None


def parse(value: str) -> TraceParent | None:
    """The trace context in ``value``, or None if it is not a valid one. Version 00
    exactly; a later version (not ff) is read for its first four fields, as the
    W3C recommendation asks."""
    if len(value) < _LENGTH or len(value) > MAX_VALUE:
        return None
    version = value[:2]
    if not _HEX.issuperset(version) or version == "ff":
        return None
    if version == "00" and len(value) != _LENGTH:
        return None
    if len(value) > _LENGTH and value[_LENGTH] != "-":
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id = _hex(value[3:35], 16)
    span_id = _hex(value[36:52], 8)
    flags = value[53:55]
    if trace_id is None or span_id is None or not _HEX.issuperset(flags):
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


def from_metadata(metadata: Mapping[str, Sequence[str]] | None) -> TraceParent | None:
    """The trace context of a request's metadata: its one ``traceparent`` (none,
    or more than one, is no trace context)."""
    if not metadata:
        return None
    values = metadata.get(KEY)
    if not values or len(values) != 1:
        return None
    return parse(values[0])
