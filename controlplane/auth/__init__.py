"""Operator authentication: API tokens and role guards."""

from controlplane.auth._tokens import Role, TokenInfo, create_token, list_tokens, revoke_token, verify_token

__all__ = ["Role", "TokenInfo", "create_token", "list_tokens", "revoke_token", "verify_token"]
