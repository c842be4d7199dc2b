"""Roles, scopes, secrets and settings: pure checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey

from control_plane.auth import Principal, Role, TokenCache, hash_secret, new_secret
from control_plane.settings import SettingsError, load_settings
from edged_formats.enrollment import prove_possession, verify_possession
from edged_formats.errors import SignatureError


def test_roles_are_ordered_and_scopes_limit_groups() -> None:
    """An operator has viewer rights but not admin; a scoped token reaches its groups only."""
    scoped = Principal("t1", "ops", Role.operator, frozenset({"lab"}))
    assert scoped.has(Role.viewer) and scoped.has(Role.operator) and not scoped.has(Role.admin)
    assert scoped.reaches("lab") and not scoped.reaches("field")
    assert Principal("t2", "root", Role.admin, None).reaches("anything")


def test_secrets_are_random_prefixed_and_stored_as_hashes() -> None:
    """Two secrets differ; the stored hash is sha256 hex, never the secret."""
    a, b = new_secret("edcp"), new_secret("edcp")
    assert a != b and a.startswith("edcp_") and len(a) > 40
    assert len(hash_secret(a)) == 64 and a not in hash_secret(a)


def test_possession_proof_binds_token_and_key() -> None:
    """The proof verifies for its own token and key only."""
    key = SigningKey(b"k" * 32)
    proof = prove_possession(key, "edenr_one")
    verify_possession(bytes(key.verify_key), "edenr_one", proof)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_possession(bytes(key.verify_key), "edenr_two", proof)
    with pytest.raises(SignatureError, match="32-byte"):
        verify_possession(b"short", "edenr_one", proof)


def test_settings_refuse_unknown_keys_and_bad_urls(tmp_path: Path) -> None:
    """A settings file with an unknown key or a foreign database URL names the key."""
    bad = tmp_path / "cp.toml"
    bad.write_text('database_url = "mysql://x"\n')
    with pytest.raises(SettingsError, match="database_url: must start with sqlite"):
        load_settings(bad)
    bad.write_text("databse_url = 'sqlite+aiosqlite:///x'\n")
    with pytest.raises(SettingsError, match="databse_url: unknown key"):
        load_settings(bad)
    bad.write_text("port = [")
    with pytest.raises(SettingsError, match="is not valid TOML"):
        load_settings(bad)
    good = tmp_path / "ok.toml"
    good.write_text('database_url = "postgresql+asyncpg://cp@db/cp"\nport = 9000\n')
    settings = load_settings(good)
    assert settings.backend == "postgresql" and settings.port == 9000


def test_the_token_cache_holds_known_tokens_for_its_ttl_and_forgets_revoked_ones() -> None:
    """A cached principal is served until its time is up; evicting its id drops it; with a
    ttl of 0 nothing is kept."""
    viewer = Principal("t1", "ops", Role.viewer, None)
    cache = TokenCache(2.0)
    assert cache.get("h1", now=100.0) is None
    cache.put("h1", viewer, None, now=100.0)
    cache.put("h2", Principal("t2", "other", Role.admin, None), 150.0, now=100.0)
    assert cache.get("h1", now=101.9) == (viewer, None)
    assert cache.get("h1", now=102.0) is None
    assert cache.get("h2", now=101.0) == (Principal("t2", "other", Role.admin, None), 150.0)
    cache.evict("t2")
    assert cache.get("h2", now=101.0) is None
    off = TokenCache(0)
    off.put("h1", viewer, None, now=100.0)
    assert off.get("h1", now=100.0) is None
