"""Operator and device secrets, roles and scopes: pure, no I/O.

Secrets are 32 random bytes, URL-safe, with a prefix naming their kind (`edcp_` operator token,
`edenr_` enrollment token, `eddev_` device API token); only their sha256 is stored. The
secrets are high-entropy, so a fast hash is enough and lookups stay one indexed equality.

Roles are ordered: viewer < operator < admin. A token with `groups` None reaches every group;
otherwise only devices in those groups (and an admin is never group-scoped in practice)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Principal", "Role", "hash_secret", "new_secret"]


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
