"""A Mosquitto broker as a supervised child process on a free 127.0.0.1 port: what the tests,
the benchmarks and `make demo` run, and the single-machine broker the control plane will
supervise when no broker URL is configured (anonymous access on loopback only, unless the
dynamic security plugin is turned on, below).

    with MosquittoBroker() as broker:        # writes mosquitto.conf, starts, waits for the port
        ...broker.host, broker.port...
        broker.kill()                        # SIGKILL: a crash, sessions and queues are gone
        broker.start()                       # again, on the same port
        broker.stop()                        # SIGTERM (SIGKILL after a grace period)

The config, the log and (with `persistence=True`) the database live in `workdir`: a directory
the caller owns (kept afterwards, e.g. pytest's tmp_path) or a temporary one removed on close.

With `dynsec=DynsecBootstrap(admin_username, admin_password)` the broker loads Mosquitto's
dynamic security plugin and refuses anonymous clients. On construction the plugin's state
file, `workdir/dynamic-security.json`, is written (or, if one is already there, kept with
its devices) so that it holds exactly one bootstrap account: the admin, with role `admin`
(ADMIN_ACLS: the plugin's command topics, the ingest subscriptions, publishing device commands)
and the current password. Everything not allowed by a role is denied (DEFAULT_ACL_ACCESS).
Device accounts are then managed at run time by `control_plane.broker_admin`.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from edged.atomic import atomic_write

__all__ = [
    "ADMIN_ACLS",
    "ADMIN_ROLE",
    "DEFAULT_ACL_ACCESS",
    "DYNSEC_FILE",
    "BrokerError",
    "DynsecBootstrap",
    "MosquittoBroker",
    "dynsec_document",
    "find_dynsec_plugin",
    "find_mosquitto",
    "free_port",
    "hash_password",
]

MOSQUITTO_FALLBACK = "/usr/sbin/mosquitto"
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
# Debian/Ubuntu (any architecture), then source and Homebrew installs.
DYNSEC_PLUGIN_GLOBS = (
    f"/usr/lib/*/{DYNSEC_PLUGIN}",
    f"/usr/lib/{DYNSEC_PLUGIN}",
    f"/usr/local/lib/{DYNSEC_PLUGIN}",
    f"/opt/homebrew/lib/{DYNSEC_PLUGIN}",
)
DYNSEC_FILE = "dynamic-security.json"
ADMIN_ROLE = "admin"
# (acltype, topic) pairs the admin role allows; the plugin checks a shared subscription
# against its full `$share/<group>/...` filter, so the ingest needs that pattern of its own.
ADMIN_ACLS: tuple[tuple[str, str], ...] = (
    ("publishClientSend", "$CONTROL/dynamic-security/#"),
    ("publishClientReceive", "$CONTROL/dynamic-security/#"),
    ("subscribePattern", "$CONTROL/dynamic-security/#"),
    ("subscribePattern", "$share/+/edged/v1/+/+"),
    ("subscribePattern", "edged/v1/#"),
    ("publishClientReceive", "edged/v1/#"),
    ("publishClientSend", "edged/v1/+/cmd/#"),
)
# What a client may do that no role of its allows: nothing but unsubscribe.
DEFAULT_ACL_ACCESS: Mapping[str, bool] = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}
SALT_BYTES = 12  # what the plugin itself uses


class BrokerError(RuntimeError):
    """The broker could not be started or stopped; the message carries the log tail."""


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, else Debian's /usr/sbin/mosquitto, else None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access(MOSQUITTO_FALLBACK, os.X_OK):
        return MOSQUITTO_FALLBACK
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pdeathsig() -> Callable[[], None]:
    """What the child runs before exec: SIGTERM when the thread that started it dies (Linux
    PR_SET_PDEATHSIG), so a killed control plane leaves no broker behind. The libc lookup
    happens here, in the parent; the child only makes the one system call."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGTERM)

    return set_pdeathsig


def find_dynsec_plugin() -> str | None:
    """Mosquitto's dynamic security plugin (`mosquitto_dynamic_security.so`), or None."""
    for pattern in DYNSEC_PLUGIN_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    return None


def hash_password(
    password: str, *, iterations: int, salt: bytes | None = None
) -> dict[str, str | int]:
    """A password as the plugin stores it: base64 PBKDF2-HMAC-SHA512 (64 bytes) of the UTF-8
    password, the base64 salt (random 12 bytes unless given) and the iteration count."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": iterations,
    }


def dynsec_document(
    existing: Mapping[str, Any] | None, admin_username: str, password: Mapping[str, str | int]
) -> dict[str, Any]:
    """The plugin's state with the bootstrap applied: the admin client (with `password`, the
    output of `hash_password`, and role ADMIN_ROLE), the admin role with exactly ADMIN_ACLS and
    DEFAULT_ACL_ACCESS. Every other client, role and group of `existing` is kept, less any
    grant of the admin role (a renamed admin's old account loses it)."""
    doc = json.loads(json.dumps(existing)) if existing is not None else {}
    clients = [c for c in doc.get("clients", []) if c.get("username") != admin_username]
    roles = [r for r in doc.get("roles", []) if r.get("rolename") != ADMIN_ROLE]
    for holder in [*clients, *doc.get("groups", [])]:
        granted = holder.get("roles", [])
        holder["roles"] = [r for r in granted if r.get("rolename") != ADMIN_ROLE]
    clients.insert(0, {
        "username": admin_username,
        "textname": "edged control plane (bootstrap)",
        **password,
        "roles": [{"rolename": ADMIN_ROLE}],
    })  # fmt: skip
    roles.insert(0, {
        "rolename": ADMIN_ROLE,
        "textname": "edged control plane: dynamic security, ingest, device commands",
        "acls": [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in ADMIN_ACLS],
    })  # fmt: skip
    doc.update(clients=clients, roles=roles, defaultACLAccess=dict(DEFAULT_ACL_ACCESS))
    doc.setdefault("groups", [])
    return doc


@dataclass(frozen=True, slots=True)
class DynsecBootstrap:
    """Run the broker with the dynamic security plugin and this admin account. `plugin` is the
    plugin's path (found with `find_dynsec_plugin` when None); `iterations` is the PBKDF2 cost
    of the admin's password hash (the plugin checks it on every admin login)."""

    admin_username: str
    admin_password: str = field(repr=False)
    plugin: str | None = None
    iterations: int = 10_000

    def __post_init__(self) -> None:
        if not self.admin_username:
            raise BrokerError("the dynamic security admin needs a username")
        if not self.admin_password:
            raise BrokerError("the dynamic security admin needs a password")
        if self.iterations < 1:
            raise BrokerError("the admin password hash needs at least one PBKDF2 iteration")


class MosquittoBroker:
    """One Mosquitto process; restartable on the same port; a context manager."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        persistence: bool = False,
        autosave_interval: int | None = None,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int | None = None,
        verbose_log: bool = False,
        extra_config: Sequence[str] = (),
        binary: str | None = None,
        start_timeout: float = 10.0,
        dynsec: DynsecBootstrap | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`max_queued_messages` is large because Mosquitto's default (1000) silently drops
        QoS 1 messages for a slow subscriber; `max_inflight_messages` None keeps Mosquitto's
        default (20); `verbose_log` adds per-packet debug lines (slow under load);
        `autosave_interval` (seconds) bounds what a SIGKILL loses with persistence on;
        `dynsec` turns on the dynamic security plugin (module docstring); `die_with_parent`
        ends the broker with the thread that started it (Linux)."""
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto not installed: run `make test`, which installs it")
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="edged-mosquitto-"))
            if workdir is None
            else Path(workdir).resolve()
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.start_timeout = start_timeout
        self.persistence = persistence
        self.die_with_parent = die_with_parent
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.output_path = self.workdir / "mosquitto.out"
        self.dynsec = dynsec
        self.dynsec_path = self.workdir / DYNSEC_FILE
        self._dynsec_plugin: str | None = None
        if dynsec is not None:
            self._dynsec_plugin = dynsec.plugin or find_dynsec_plugin()
            if self._dynsec_plugin is None:
                raise BrokerError(
                    f"Mosquitto's dynamic security plugin ({DYNSEC_PLUGIN}) is not installed"
                )
            self._bootstrap_dynsec(dynsec)
        self.config_path.write_text(
            self._config(
                persistence=persistence,
                autosave_interval=autosave_interval,
                max_queued_messages=max_queued_messages,
                max_inflight_messages=max_inflight_messages,
                verbose_log=verbose_log,
                extra_config=extra_config,
            )
        )
        self._process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start() took

    def _bootstrap_dynsec(self, dynsec: DynsecBootstrap) -> None:
        existing = None
        if self.dynsec_path.exists():
            try:
                existing = json.loads(self.dynsec_path.read_text())
            except (OSError, ValueError) as exc:
                raise BrokerError(
                    f"cannot read the dynamic security state {self.dynsec_path}: {exc}"
                ) from exc
            if not isinstance(existing, dict):
                raise BrokerError(f"{self.dynsec_path} does not hold a JSON object")
        password = hash_password(dynsec.admin_password, iterations=dynsec.iterations)
        doc = dynsec_document(existing, dynsec.admin_username, password)
        atomic_write(self.dynsec_path, json.dumps(doc, indent=1).encode(), mode=0o600)

    def _config(
        self,
        *,
        persistence: bool,
        autosave_interval: int | None,
        max_queued_messages: int,
        max_inflight_messages: int | None,
        verbose_log: bool,
        extra_config: Sequence[str],
    ) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.dynsec else 'true'}",
            f"max_queued_messages {max_queued_messages}",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            # Nagle plus delayed ACKs cost every request/response exchange (enrollment's
            # account commands) about 40 ms; the broker's messages are small and latency-bound.
            "set_tcp_nodelay true",
        ]
        log_types = ["error", "warning", "notice", "information"]
        if verbose_log:
            log_types += ["subscribe", "unsubscribe", "debug"]
        lines += [f"log_type {kind}" for kind in log_types]
        if self._dynsec_plugin is not None:
            lines += [
                f"plugin {self._dynsec_plugin}",
                f"plugin_opt_config_file {self.dynsec_path}",
            ]
        if max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {max_inflight_messages}")
        if persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
            if autosave_interval is not None:
                lines.append(f"autosave_interval {autosave_interval}")
        else:
            lines.append("persistence false")
        if os.geteuid() == 0:
            # As root, Mosquitto otherwise drops to the `mosquitto` user, which cannot write
            # the log or the database into a root-owned temporary directory.
            lines.append("user root")
        lines += list(extra_config)
        return "\n".join(lines) + "\n"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        """Start the process (again, on the same port) and wait until it accepts connections."""
        if self.running:
            raise BrokerError(f"mosquitto already running on {self.host}:{self.port}")
        self._reap()
        started = time.perf_counter()
        with self.output_path.open("ab") as output:
            self._process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not us
                # one prctl() call between fork and exec: nothing that could take a lock
                preexec_fn=_pdeathsig() if self.die_with_parent else None,  # noqa: PLW1509
            )
        try:
            self._wait_ready(started + self.start_timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.perf_counter() - started

    def _wait_ready(self, deadline: float) -> None:
        assert self._process is not None
        while True:
            code = self._process.poll()
            if code is not None:
                raise BrokerError(
                    f"mosquitto exited with status {code} while starting on "
                    f"{self.host}:{self.port}\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{self.start_timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful shutdown (SIGTERM; persistence saves), SIGKILL if it takes too long."""
        if not self.running:
            self._reap()
            return
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL, like a crash or power loss of the broker host."""
        if self.running:
            assert self._process is not None
            self._process.kill()
            self._process.wait(5.0)
        self._reap()

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            self._process = None

    def close(self) -> None:
        """Stop the broker and remove the working directory if it was a temporary one.

        Without persistence there is nothing to save, so this kills: Mosquitto 2.0.11 takes
        about 0.1 s to honour SIGTERM right after a client disconnected."""
        if self.persistence:
            self.stop()
        else:
            self.kill()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- diagnostics -------------------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Mosquitto's log and of its stdout/stderr, for error messages."""
        parts = []
        for path in (self.log_path, self.output_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            tail = text.splitlines()[-lines:]
            if tail:
                parts.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no log in {self.workdir})"

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<MosquittoBroker {self.host}:{self.port} {state}>"
