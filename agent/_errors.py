"""Errors of the agent package.

AgentError
├── ConfigError          bad settings or a set_config command with invalid values
├── DeployError          a step of a model deployment failed or was refused (the ack's reason and stage)
└── AgentRuntimeError    (agent.runtime) inference runtime problems
"""

from __future__ import annotations

__all__ = ["AgentError", "ConfigError", "DeployError"]


class AgentError(Exception):
    """Root of the agent's errors."""


class ConfigError(AgentError, ValueError):
    """Invalid agent configuration."""


class DeployError(AgentError):
    """A deployment step failed or was refused; ``stage`` says which, the message why (with figures).

    ``keep_partial``: the download itself failed, so its partial file is kept for the next deployment to resume.
    """

    def __init__(self, stage: str, reason: str, *, keep_partial: bool = False) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.keep_partial = keep_partial
