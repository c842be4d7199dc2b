"""Operator and device secrets, roles and scopes: pure, no I/O.

Secrets are 32 random bytes, URL-safe, with a prefix naming their kind (`edcp_` operator token,
`edenr_` enrollment token, `eddev_` device API token); only their sha256 is stored. The
secrets are high-entropy, so a fast hash is enough and lookups stay one indexed equality.

Roles are ordered: viewer < operator < admin. A token with `groups` None reaches every group;
otherwise only devices in those groups. An admin token is never group-scoped: what only an
admin does (tokens, the audit log, the repository, revoking models) is fleet-wide, so a scoped
admin could mint itself an unscoped token. Such tokens are refused when made and, should one
exist in the database, refused by every admin route.

`TokenCache` keeps a known token's principal for a few seconds, so most requests skip the
token lookup's database round trip; unknown tokens are never cached."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["SCOPED_ADMIN", "Principal", "Role", "TokenCache", "hash_secret", "new_secret"]

SCOPED_ADMIN = (
    "an admin token reaches every group (its actions are fleet-wide): leave out groups, "
    "or give a group-scoped token the operator role"
)


class Role(IntEnum):
    viewer = 1
    operator = 2
    admin = 3


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an operator token's id, name, role and group scope."""

    token_id: str
    name: str
    role: Role
    groups: frozenset[str] | None  # None: every group

    def has(self, role: Role) -> bool:
        return self.role >= role

    def reaches(self, group: str) -> bool:
        return self.groups is None or group in self.groups

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.token_id})"


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    expires_at: float | None  # the token's own expiry
    fresh_until: float  # when the cache must ask the database again


class TokenCache:
    """Principals of known tokens by hash, each for `ttl_s` (0: off). A revocation through
    this process evicts at once; one through another replica holds within `ttl_s`."""

    MAX_ENTRIES = 10_000  # only valid tokens get in; emptied whole if ever reached

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, _Cached] = {}

    def get(self, token_hash: str, now: float) -> tuple[Principal, float | None] | None:
        entry = self._entries.get(token_hash)
        if entry is None or entry.fresh_until <= now:
            return None
        return entry.principal, entry.expires_at

    def put(
        self, token_hash: str, principal: Principal, expires_at: float | None, now: float
    ) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[token_hash] = _Cached(principal, expires_at, now + self.ttl_s)

    def evict(self, token_id: str) -> None:
        for token_hash in [h for h, e in self._entries.items() if e.principal.token_id == token_id]:
            del self._entries[token_hash]
