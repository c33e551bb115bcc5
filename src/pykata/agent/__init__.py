"""Host side of the agent protocol: a typed client and the pb <-> runtime conversions."""

from pykata.agent.client import AgentClient

__all__ = ["AgentClient"]
