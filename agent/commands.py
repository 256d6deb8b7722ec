"""What a long-running command handler gets to work with: :class:`CommandContext`, and the handler's type.

A handler (``deploy_model``: :func:`agent._deploy.handle`; ``join_round``: :meth:`agent.join_round.Rounds.handle`)
runs on its own thread beside the agent's MQTT loop and returns ``(ok, reason, result)``, which the agent acks.
It sees the agent only through this protocol, never the daemon's private state; the agent's registry
(``agent._daemon.Agent``) maps each command kind to its handler by direct import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from agent import protocol as wire

if TYPE_CHECKING:
    from agent._active_model import ActiveModel
    from agent._settings import AgentSettings

__all__ = ["CommandContext", "CommandHandler", "CommandResult"]

# (ok, reason, result): the ack of a command; reason says why when ok is false.
CommandResult: TypeAlias = tuple[bool, str | None, dict[str, Any]]


class CommandContext(Protocol):
    """The parts of one agent that command handlers use."""

    @property
    def device_id(self) -> str: ...

    @property
    def settings(self) -> AgentSettings: ...

    @property
    def models(self) -> ActiveModel:
        """The owner of the device's active model (deployments go through it)."""
        ...

    def wait_for_stop(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True as soon as the agent is stopping."""
        ...


CommandHandler: TypeAlias = Callable[[CommandContext, wire.Command], CommandResult]
