"""API keys: each belongs to one workspace and carries one role.

A key is `sluice_<id>_<secret>`: the id (16 hex digits) is public and is the row's primary key;
the secret (32 random bytes) is shown once, when the key is created, and only the SHA-256 of
the whole key is stored. With 256 random bits a fast hash is enough (nothing to brute-force);
the stored hash is compared in constant time. A revoked key stays as a row (its id is never
reused and `list_keys` shows when it was revoked)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import ForeignKey, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.entities import Base, utcnow

KEY_PREFIX = "sluice_"
_KEY_RE = re.compile(r"^sluice_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


class Role(StrEnum):
    """reader: search, answers, read documents and jobs; writer: + upload, delete, cancel;
    admin: + dead letters, keys, replay."""

    READER = "reader"
    WRITER = "writer"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.READER: 0, Role.WRITER: 1, Role.ADMIN: 2}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(255))
    secret_hash: Mapped[str] = mapped_column(String(64))
    rate_limit: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


@dataclass(frozen=True, slots=True)
class NewKey:
    key: ApiKey
    token: str
    """The full key, to be shown once: it is not stored."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(
    session: Session,
    *,
    workspace_id: str,
    role: Role,
    name: str | None = None,
    rate_limit: str | None = None,
) -> NewKey:
    """A new key for `workspace_id` (the workspace row must exist)."""
    key_id = secrets.token_hex(8)
    token = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    key = ApiKey(id=key_id, workspace_id=workspace_id, role=Role(role), name=name,
                 secret_hash=_hash(token), rate_limit=rate_limit)
    session.add(key)
    session.flush()
    return NewKey(key=key, token=token)


def parse_key_id(token: str) -> str | None:
    """The id part of a well-formed key, else None."""
    match = _KEY_RE.match(token)
    return match.group(1) if match else None


def find_active_key(session: Session, token: str) -> ApiKey | None:
    """The unrevoked key `token` is, or None (malformed, unknown, revoked or wrong secret)."""
    key_id = parse_key_id(token)
    if key_id is None:
        return None
    key = session.get(ApiKey, key_id)
    # Compared even when the id is unknown, so timing does not tell which ids exist.
    stored = key.secret_hash if key is not None else "0" * 64
    if not hmac.compare_digest(stored, _hash(token)) or key is None:
        return None
    return None if key.revoked_at is not None else key


def list_keys(session: Session, *, workspace_id: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.workspace_id, ApiKey.created_at, ApiKey.id)
    if workspace_id is not None:
        stmt = stmt.where(ApiKey.workspace_id == workspace_id)
    return list(session.scalars(stmt))


def revoke_key(session: Session, *, key_id: str, workspace_id: str | None = None) -> ApiKey | None:
    """Revoke a key (of `workspace_id` when given); returns it, or None if there is none.
    Revoking twice keeps the first revocation time."""
    key = session.get(ApiKey, key_id)
    if key is None or (workspace_id is not None and key.workspace_id != workspace_id):
        return None
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def touch(session: Session, *, key_id: str, now: datetime, interval: timedelta) -> None:
    """Record a use of the key, at most once per `interval` (a write per request would
    serialise every request on SQLite's write lock)."""
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id,
               (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < now - interval))
        .values(last_used_at=now)
    )
