"""People's accounts for the annotation page: who may use it with their own link, and as whom.

Assumptions, up front:
- Only a hash of a link's token is stored (`token_hash`); the token is shown once, when made.
- Once a store has any account (even a revoked one), the page takes the annotator from the token and nothing
  else gets in (`illume.annotate.server`); revoking takes effect at once.
- An account's name is the annotator name its judgments are stored under; a name that judged as something
  other than a person (a simulated critic, the reward model) cannot become an account.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from illume.feedback.engine import WriteSessions
from illume.feedback.schema import ACCOUNT_ROLES, AccountRow, AnnotatorRow, utc_now


def token_hash(token: str) -> str:
    """What the store keeps of an account's token: sha256, hex.

    The tokens are 32 random bytes (`secrets.token_urlsafe(32)`), so a slow password hash would add nothing
    against guessing, and a fast one lets the server check the token on every request (revocation is
    immediate). Lookups go by the hash, so no comparison leaks a token's prefix.
    """
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    """A person with their own link (`FeedbackStore.add_account`)."""

    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def add_account(sessions: WriteSessions, name: str, role: str = "annotator") -> str:
    """`FeedbackStore.add_account` over `sessions`."""
    name = name.strip() if isinstance(name, str) else name
    if not name or len(name) > 255 or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"an account name must be 1-255 printable characters, got {name!r}")
    if role not in ACCOUNT_ROLES:
        raise ValueError(f"role must be one of {', '.join(ACCOUNT_ROLES)}, got {role!r}")
    token = secrets.token_urlsafe(32)
    with sessions.begin() as session:
        kind = session.scalar(select(AnnotatorRow.kind).where(AnnotatorRow.name == name))
        if kind is not None and kind != "person":
            raise ValueError(f"{name!r} has judged as {kind!r} in this store; choose another name")
        row = session.get(AccountRow, name)
        if row is not None and row.revoked_at is None:
            raise ValueError(f"{name!r} already has an active account: revoke it first for a new link")
        if row is None:
            session.add(AccountRow(name=name, role=role, token_hash=token_hash(token)))
        else:
            row.role, row.token_hash, row.revoked_at, row.created_at = role, token_hash(token), None, utc_now()
    return token


def revoke_account(sessions: WriteSessions, name: str) -> bool:
    """`FeedbackStore.revoke_account` over `sessions`."""
    with sessions.begin() as session:
        row = session.get(AccountRow, name)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utc_now()
        return True


def accounts(sessions: sessionmaker[Session]) -> list[Account]:
    """`FeedbackStore.accounts` over `sessions`."""
    with sessions() as session:
        return [Account(r.name, r.role, r.created_at, r.revoked_at)
                for r in session.scalars(select(AccountRow).order_by(AccountRow.name))]


def has_accounts(sessions: sessionmaker[Session]) -> bool:
    """`FeedbackStore.has_accounts` over `sessions`."""
    with sessions() as session:
        return session.scalar(select(AccountRow.name).limit(1)) is not None


def account_for_token(sessions: sessionmaker[Session], token: str) -> Account | None:
    """`FeedbackStore.account_for_token` over `sessions`."""
    if not token:
        return None
    with sessions() as session:
        row = session.scalar(select(AccountRow).where(AccountRow.token_hash == token_hash(token)))
        if row is None or row.revoked_at is not None:
            return None
        return Account(row.name, row.role, row.created_at, row.revoked_at)
