#!/usr/bin/env python3
"""Give a production Mosquitto the control plane's admin account before it starts: write the
dynamic security plugin's state file (the compose file's one-shot `broker-init` service, see
docs/deployment.md; in the image as `edged-dynsec-init`).

    edged-dynsec-init FILE [--config CP_TOML] [--owner UID:GID]

The account is the one the control plane logs in with: `broker_admin_username` and the password
in `broker_admin_password_file`, read through the control plane's own settings
(EDGED_CP_BROKER_ADMIN_USERNAME, EDGED_CP_BROKER_ADMIN_PASSWORD_FILE or --config). The document
is the one the single-machine broker gets (control_plane.local_broker.dynsec_document): the admin
client with role `admin` (ADMIN_ACLS), everything no role allows denied, every device account
already in FILE kept. When FILE already grants that admin that password and those ACLs it is
left untouched, so a run beside a live broker (which rewrites FILE itself) changes nothing.
`--owner` hands the file and its directory to the broker's user (1883:1883 in the
eclipse-mosquitto image) when run as root. Errors are one sentence on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from control_plane.errors import ControlPlaneError
from control_plane.local_broker import (
    ADMIN_ACLS,
    ADMIN_ROLE,
    DEFAULT_ACL_ACCESS,
    dynsec_document,
    hash_password,
)
from control_plane.settings import load_settings
from edged.atomic import atomic_write

ITERATIONS = 10_000  # PBKDF2 cost of the admin's hash, as the supervised broker's bootstrap


class InitError(ControlPlaneError):
    """The state file or the password cannot be read or written."""


def admin_is_current(doc: Mapping[str, Any], username: str, password: str) -> bool:
    """True when `doc` (as the plugin saves it: any order, ACL priorities) already holds
    exactly the bootstrap's admin: that password, only role `admin`, no client id binding,
    ADMIN_ACLS, DEFAULT_ACL_ACCESS, and no other holder of role `admin`."""
    try:
        clients = [c for c in doc["clients"] if c.get("username") == username]
        roles = [r for r in doc["roles"] if r.get("rolename") == ADMIN_ROLE]
        if len(clients) != 1 or len(roles) != 1:
            return False
        client, role = clients[0], roles[0]
        salt = base64.b64decode(client["salt"], validate=True)
        stored = hash_password(password, iterations=int(client["iterations"]), salt=salt)
        if not hmac.compare_digest(str(stored["password"]), str(client.get("password", ""))):
            return False
        if [r.get("rolename") for r in client.get("roles", [])] != [ADMIN_ROLE]:
            return False
        if client.get("clientid") or client.get("disabled") or client.get("groups"):
            return False
        acls = {
            (a["acltype"], a["topic"], a.get("allow"), a.get("priority", 0)) for a in role["acls"]
        }
        if len(role["acls"]) != len(ADMIN_ACLS) or acls != {(k, t, True, 0) for k, t in ADMIN_ACLS}:
            return False
        holders = [c for c in doc["clients"] if c is not client] + list(doc.get("groups", []))
        if any(r.get("rolename") == ADMIN_ROLE for h in holders for r in h.get("roles", [])):
            return False
        return doc.get("defaultACLAccess") == dict(DEFAULT_ACL_ACCESS)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
        return False


def _owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not (uid.isdigit() and sep and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not UID:GID")
    return int(uid), int(gid)


def _read_existing(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InitError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InitError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InitError(f"{path} does not hold a JSON object")
    return doc


def initialise(path: Path, username: str, password: str, owner: tuple[int, int] | None) -> bool:
    """Bring `path` to the bootstrap state; True if it was written, False if already there."""
    if not password:
        raise InitError("the broker admin password is empty")
    existing = _read_existing(path)
    changed = existing is None or not admin_is_current(existing, username, password)
    if changed:
        doc = dynsec_document(existing, username, hash_password(password, iterations=ITERATIONS))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(doc, indent=1).encode(), mode=0o600)
        except OSError as exc:
            raise InitError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if owner is not None:
        try:
            for target in (path.parent, path):
                os.chown(target, *owner)
        except OSError as exc:
            raise InitError(f"cannot hand {path} to {owner[0]}:{owner[1]}: {exc}") from exc
    return changed


def parser() -> argparse.ArgumentParser:
    """The command line (the compose file's `command:` is checked against it)."""
    p = argparse.ArgumentParser(prog="edged-dynsec-init", description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path, help="the plugin's plugin_opt_config_file")
    p.add_argument("--config", type=Path, help="the control plane's TOML settings")
    p.add_argument("--owner", type=_owner, help="UID:GID the broker runs as")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        password_file = settings.broker_admin_password_file
        if password_file is None:
            raise InitError("broker_admin_password_file is not set")
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InitError(f"cannot read {password_file}: {exc.strerror or exc}") from exc
        written = initialise(args.file, settings.broker_admin_username, password, args.owner)
    except ControlPlaneError as exc:
        print(f"edged-dynsec-init: {exc}", file=sys.stderr)
        return 2
    state = "written" if written else "already current"
    print(f"{args.file}: admin {settings.broker_admin_username!r} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
