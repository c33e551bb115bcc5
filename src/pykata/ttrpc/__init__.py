"""ttRPC, wire-compatible with containerd/ttrpc, over asyncio streams.

No domain imports: this package knows frames, requests and status codes only.
See PROTOCOL.md beside this file.
"""

from pykata.ttrpc.client import Client
from pykata.ttrpc.frames import MAX_DATA
from pykata.ttrpc.server import Server, call_metadata

__all__ = ["MAX_DATA", "Client", "Server", "call_metadata"]
