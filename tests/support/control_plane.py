"""A real `edged-control-plane serve` process under test, and the clients tests drive it with.

    with ControlPlaneProcess(db_url, broker, admin_password, workdir) as cp:
        api = cp.api(cp.admin_token)              # httpx.Client with the token
        device = cp.enroll(tmp_path, group="lab") # the real enrollment flow
        device.publish("telemetry", [body, ...])  # signed, QoS 1, on its own topic

The process is started with `EDGED_CP_*` variables (no broker of its own: the test's
dynamic-security Mosquitto); the admin token is made with `create-token` before start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.local_broker import MosquittoBroker, free_port
from edged.enrollment import Enrollment, enroll
from edged.identity import DeviceIdentity
from edged_formats import Record, encode_batch

__all__ = [
    "CP",
    "ControlPlaneProcess",
    "DeviceClient",
    "child_bundle",
    "edged_enroll",
    "init_repository",
    "repository_fetcher",
    "run_sql",
    "wait_for",
]

CP = [sys.executable, "-m", "control_plane.cli"]
# a CI run sharing the cores with a package build once took over 30 s to be ready
READY_TIMEOUT_S = 90.0


def edged_enroll(url: str, token: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """`edged enroll --url URL --token TOKEN --state-dir DIR` as a real process."""
    command = [
        sys.executable,
        "-m",
        "edged.cli",
        "enroll",
        "--url",
        url,
        "--token",
        token,
        "--state-dir",
        str(state_dir),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def run_sql(database_url: str, statements: Sequence[str]) -> None:
    """Statements straight on a test database (SQLite file or PostgreSQL), in one
    transaction; the database's own errors pass through."""
    import asyncio

    from sqlalchemy import text

    from control_plane.db.engine import Database

    async def run() -> None:
        db = Database(database_url)
        try:
            async with db.engine.begin() as conn:
                for statement in statements:
                    await conn.execute(text(statement))
        finally:
            await db.close()

    asyncio.run(run())


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """The first truthy value of `predicate()` within `timeout`, else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class ControlPlaneProcess:
    def __init__(
        self,
        database_url: str,
        broker: MosquittoBroker,
        admin_username: str,
        admin_password: str,
        workdir: Path,
        **settings: str,
    ) -> None:
        self.broker, self.workdir = broker, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        password_file = workdir / "broker-admin.password"
        password_file.write_text(admin_password)
        password_file.chmod(0o600)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "EDGED_CP_DATABASE_URL": database_url,
            "EDGED_CP_DATA_DIR": str(workdir / "data"),
            "EDGED_CP_PORT": str(self.port),
            "EDGED_CP_BROKER_URL": broker.url,
            "EDGED_CP_BROKER_ADMIN_USERNAME": admin_username,
            "EDGED_CP_BROKER_ADMIN_PASSWORD_FILE": str(password_file),
            "EDGED_CP_INGEST_CLIENT_ID": f"cp-test-{uuid.uuid4().hex[:8]}",
            "EDGED_CP_INGEST_GROUP": f"ingest-{uuid.uuid4().hex[:8]}",
            "EDGED_CP_INGEST_LINGER_S": "0.02",
            "EDGED_CP_DEVICE_CACHE_S": "0",
            # every test device and operator calls from 127.0.0.1: per-address limits off,
            # except where a test sets them (test_enrollment)
            "EDGED_CP_ENROLL_PER_MINUTE": "0",
            "EDGED_CP_AUTH_FAILURES_PER_MINUTE": "0",
            **{f"EDGED_CP_{k.upper()}": v for k, v in settings.items()},
        }
        self.log_path = workdir / "control-plane.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_token = ""

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CP, *args], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )

    def start(self) -> None:
        migrated = self.run_cli("migrate")
        assert migrated.returncode == 0, migrated.stderr
        if not self.admin_token:
            made = self.run_cli("create-token", "--name", "test-admin", "--role", "admin")
            assert made.returncode == 0, made.stderr
            self.admin_token = made.stdout.strip()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*CP, "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"control plane exited {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"control plane not ready in {READY_TIMEOUT_S:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> ControlPlaneProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- clients ----------------------------------------------------------------------------

    def api(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=15)

    def create_token(self, role: str, groups: Sequence[str] | None = None) -> dict[str, Any]:
        """A new operator token as the API returns it: its `id`, the secret `token`, ..."""
        with self.api(self.admin_token) as api:
            body: dict[str, Any] = {"name": f"{role}-{uuid.uuid4().hex[:6]}", "role": role}
            if groups is not None:
                body["groups"] = list(groups)
            response = api.post("/v1/tokens", json=body)
            assert response.status_code == 201, response.text
            created: dict[str, Any] = response.json()
            return created

    def new_token(self, role: str, groups: Sequence[str] | None = None) -> str:
        return str(self.create_token(role, groups)["token"])

    def enrollment_token(self, group: str, tags: Sequence[str] = (), **extra: Any) -> str:
        with self.api(self.admin_token) as api:
            response = api.post(
                "/v1/enrollment-tokens", json={"group": group, "tags": list(tags), **extra}
            )
            assert response.status_code == 201, response.text
            return str(response.json()["token"])

    def enroll(self, state_dir: Path, group: str, tags: Sequence[str] = ()) -> DeviceClient:
        identity = DeviceIdentity.load_or_create(state_dir / "device.key")
        enrollment = enroll(self.url, self.enrollment_token(group, tags), identity, state_dir)
        password = (state_dir / "uplink.password").read_text()
        return DeviceClient(identity, enrollment, password, state_dir)


@dataclass
class DeviceClient:
    """An enrolled device's MQTT side: signed records on its own topics (QoS 1)."""

    identity: DeviceIdentity
    enrollment: Enrollment
    password: str
    state_dir: Path
    boot: int = 1
    seq: int = 0
    client: mqtt.Client | None = None
    _connected: threading.Event = field(default_factory=threading.Event)
    disconnects: list[Any] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return self.enrollment.device_id

    @property
    def api_token(self) -> str:
        return (self.state_dir / "api.token").read_text()

    def connect(self, password: str | None = None) -> Any:
        """Connect; the CONNACK reason code (success or the refusal)."""
        result: dict[str, Any] = {}
        done = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5
        )
        client.username_pw_set(self.enrollment.username, password or self.password)

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            result["reason"] = reason
            if not reason.is_failure:
                self._connected.set()
            done.set()

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self._connected.clear()
            self.disconnects.append(reason)
            done.set()

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        client.connect(self.enrollment.broker_host, self.enrollment.broker_port)
        client.loop_start()
        assert done.wait(10), "no CONNACK"
        if result.get("reason") is None or result["reason"].is_failure:
            client.loop_stop()
            client.disconnect()
            return result.get("reason")
        self.client = client
        return result["reason"]

    def message(
        self,
        channel: str,
        bodies: Sequence[Any],
        kind: str | None = None,
        created: float | None = None,
    ) -> bytes:
        kind = (
            kind
            or {"telemetry": "telemetry", "events": "event", "samples": "sample", "state": "state"}[
                channel
            ]
        )
        records = []
        for body in bodies:
            self.seq += 1
            records.append(Record(kind, self.boot, self.seq, created or time.time(), body))
        return encode_batch(self.device_id, channel, records, self.identity.signing_key)

    def publish_raw(self, topic: str, payload: bytes) -> int:
        """QoS 1 publish; the PUBACK's reason code (0 accepted, 0x87 not authorised, ...)."""
        assert self.client is not None, "connect() first"
        reasons: list[int] = []
        done = threading.Event()

        def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
            reasons.append(int(reason.value))
            done.set()

        self.client.on_publish = on_publish
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == 0, f"publish failed locally: {info.rc}"
        assert done.wait(10), "no PUBACK"
        return reasons[0]

    def publish(self, channel: str, bodies: Sequence[Any], **kw: Any) -> bytes:
        payload = self.message(channel, bodies, **kw)
        topic = f"edged/v1/{self.device_id}/{channel}"
        reason = self.publish_raw(topic, payload)
        assert reason in (0, 16), f"PUBACK reason {reason:#x}"
        return payload

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


# -- the signed update repository (issue 6) ---------------------------------------------------


def init_repository(cp: ControlPlaneProcess, offline_dir: Path, *extra: str) -> Path:
    """`keys init` (root keys into `offline_dir`, online keys into the server's key_dir) and
    `root install` of 1.root.json straight into the database; the root file's path."""
    key_dir = Path(cp.env["EDGED_CP_DATA_DIR"]) / "keys"
    made = cp.run_cli(
        "keys", "init", "--offline-dir", str(offline_dir), "--key-dir", str(key_dir), *extra
    )
    assert made.returncode == 0, made.stderr
    root = Path(made.stdout.strip())
    installed = cp.run_cli("root", "install", str(root))
    assert installed.returncode == 0, installed.stderr
    return root


def repository_fetcher(cp: ControlPlaneProcess, token: str) -> Any:
    """The device's HttpFetcher pointed at this control plane's repository routes."""
    from edged.ota.fetcher import HttpFetcher

    return HttpFetcher(f"{cp.url}/v1/repository", token, timeout_s=10, attempts=1)


def child_bundle(parent: bytes, version: str, **changes: Any) -> bytes:
    """A valid bundle made from `parent`: another version whose parent is `parent`'s, with
    `changes` to the manifest (metrics, say) and the same members unless `members` is given."""
    import dataclasses

    from edged_formats.bundle import digest_members, read_bundle, write_bundle

    bundle = read_bundle(parent)
    members = dict(changes.pop("members", bundle.members))
    manifest = dataclasses.replace(
        bundle.manifest,
        version=version,
        parent_version=bundle.manifest.version,
        members=digest_members(members),
        **changes,
    )
    return write_bundle(manifest, members)
