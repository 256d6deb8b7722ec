"""Operator API tokens: bearer tokens with a role, stored as SHA-256 hashes."""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, select

from controlplane.db import ApiToken, utcnow

__all__ = ["Role", "TokenInfo", "create_token", "list_tokens", "revoke_token", "verify_token"]

TOKEN_PREFIX = "ef_"


class Role(enum.StrEnum):
    """Each role may do what the ones below it may."""

    VIEWER = "viewer"  # read the fleet, telemetry, stats
    OPERATOR = "operator"  # + commands, device updates
    ADMIN = "admin"  # + enrolment, deletion

    @property
    def rank(self) -> int:
        return [Role.VIEWER, Role.OPERATOR, Role.ADMIN].index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: Role


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, role: Role, name: str = "") -> tuple[TokenInfo, str]:
    """Create a token; the secret is returned once and never stored."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name or f"{role}-token", role=str(role), token_hash=_digest(secret), created_at=utcnow())
    with Session(engine) as session:
        session.add(row)
        session.commit()
        session.refresh(row)
        assert row.id is not None
        return TokenInfo(row.id, row.name, Role(row.role)), secret


def verify_token(engine: Engine, secret: str) -> TokenInfo | None:
    with Session(engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.token_hash == _digest(secret))).first()
        if row is None or row.revoked or row.id is None:
            return None
        return TokenInfo(row.id, row.name, Role(row.role))


def list_tokens(engine: Engine) -> list[ApiToken]:
    with Session(engine) as session:
        return list(session.exec(select(ApiToken).order_by(ApiToken.id)))  # type: ignore[arg-type]


def revoke_token(engine: Engine, token_id: int) -> bool:
    with Session(engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            return False
        row.revoked = True
        session.add(row)
        session.commit()
        return True
