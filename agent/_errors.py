"""Errors of the agent package.

AgentError
├── ConfigError          bad settings or a set_config command with invalid values
└── AgentRuntimeError    (agent.runtime) inference runtime problems
"""

from __future__ import annotations

__all__ = ["AgentError", "ConfigError"]


class AgentError(Exception):
    """Root of the agent's errors."""


class ConfigError(AgentError, ValueError):
    """Invalid agent configuration."""
