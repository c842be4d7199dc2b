"""Device credentials at a real Mosquitto with the dynamic security plugin: a granted device
reaches its own topics and nothing else, and revoking or disabling it shuts it out at once."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from control_plane.broker_admin import DynsecAdmin, NullBrokerAdmin, device_acls, role_name
from control_plane.errors import BrokerAdminError
from control_plane.local_broker import (
    ADMIN_ROLE,
    DEFAULT_ACL_ACCESS,
    DYNSEC_FILE,
    DynsecBootstrap,
    MosquittoBroker,
)

ADMIN = "edged-control-plane"
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x87  # 2.0.11 answers a wrong password with Not authorized
ADMINISTRATIVE_ACTION = 0x98
NO_SUBSCRIBERS = 0x10  # a success
WAIT = 5.0


class Peer:
    """A bare paho MQTT 5 client whose callbacks are handed to the event loop; it never
    reconnects by itself, so being disconnected by the broker stays visible."""

    def __init__(
        self,
        broker: MosquittoBroker,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        will: str | None = None,
    ) -> None:
        self.broker = broker
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self.disconnect_reason: ReasonCode | None = None
        self.connack = -1  # the CONNACK's reason code, once it came
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will, f"{username} offline", qos=1, retain=True)
        client.on_connect = lambda _c, _u, _f, rc, _p: self._soon(self._on_connack, rc)
        client.on_disconnect = lambda _c, _u, _f, rc, _p: self._soon(self._on_disconnect, rc)
        client.on_publish = lambda _c, _u, mid, rc, _p: self._soon(self._on_ack, mid, rc)
        client.on_subscribe = lambda _c, _u, mid, rcs, _p: self._soon(self._on_ack, mid, rcs[0])
        client.on_message = lambda _c, _u, m: self._soon(
            self.messages.put_nowait, (m.topic, m.payload)
        )
        self.client = client

    def _soon(self, callback: Callable[..., Any], *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_connack(self, reason: ReasonCode) -> None:
        if not self._connack.done():
            self._connack.set_result(reason)

    def _on_disconnect(self, reason: ReasonCode) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_ack(self, mid: int, reason: ReasonCode) -> None:
        ack = self._acks.pop(mid, None)
        if ack is not None and not ack.done():
            ack.set_result(reason)

    async def connect(self) -> int:
        """The CONNACK's reason code, success (0) or not."""
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        self.connack = (await asyncio.wait_for(asyncio.shield(self._connack), WAIT)).value
        return self.connack

    async def _acked(self, mid: int) -> ReasonCode:
        ack = self._loop.create_future()
        self._acks[mid] = ack
        return await asyncio.wait_for(ack, WAIT)

    async def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> int:
        """Publish with QoS 1; the PUBACK's reason code."""
        return (await self._acked(self.client.publish(topic, payload, 1, retain).mid)).value

    async def subscribe(self, topic_filter: str) -> int:
        """Subscribe with QoS 1; the SUBACK's reason code (0x01: granted QoS 1)."""
        mid = self.client.subscribe(topic_filter, qos=1)[1]
        assert mid is not None
        return (await self._acked(mid)).value

    async def next_message(self) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.messages.get(), WAIT)

    def abort(self) -> None:
        """End the TCP connection without DISCONNECT, as a crash or power loss does."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


Login = Callable[..., Awaitable[Peer]]


@pytest.fixture
def dynsec_broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh broker with the dynamic security plugin and the bootstrap admin."""
    bootstrap = DynsecBootstrap(ADMIN, ADMIN_PASSWORD)
    with MosquittoBroker(binary=mosquitto_binary, workdir=tmp_path, dynsec=bootstrap) as broker:
        yield broker


@pytest.fixture
async def admin(dynsec_broker: MosquittoBroker) -> AsyncIterator[DynsecAdmin]:
    """The control plane's admin session with that broker."""
    async with DynsecAdmin(dynsec_broker.host, dynsec_broker.port, ADMIN, ADMIN_PASSWORD) as a:
        yield a


@pytest.fixture
async def peer(dynsec_broker: MosquittoBroker) -> AsyncIterator[Login]:
    """`await peer(username, password, client_id=..., will=...)`: a Peer past its CONNACK."""
    made: list[Peer] = []

    async def make(username: str | None, password: str | None, **options: Any) -> Peer:
        client = Peer(dynsec_broker, username, password, **options)
        made.append(client)
        await client.connect()
        return client

    yield make
    for client in made:
        await client.close()


async def device(peer: Login, device_id: str, password: str, **options: Any) -> Peer:
    """A device logged in under its own client id, as the daemon does."""
    client = await peer(device_id, password, client_id=device_id, **options)
    assert client.connack == 0, client.connack
    return client


async def ingest(peer: Login, topic_filter: str = "edged/v1/#") -> Peer:
    """The control plane's side: the admin account, subscribed to `topic_filter`."""
    client = await peer(ADMIN, ADMIN_PASSWORD)
    assert client.connack == 0, client.connack
    assert await client.subscribe(topic_filter) == 1
    return client


async def test_granted_device_publishes_on_its_own_topics(admin: DynsecAdmin, peer: Login) -> None:
    """A granted device publishes on all four uplink channels; the shared subscription gets them."""
    await admin.grant_device("dev-a", "pw-a")
    sub = await ingest(peer, "$share/ingest/edged/v1/+/+")
    dev = await device(peer, "dev-a", "pw-a", will="edged/v1/dev-a/state")
    for channel in ("events", "telemetry", "samples", "state"):
        assert await dev.publish(f"edged/v1/dev-a/{channel}", retain=channel == "state") == 0
        assert await sub.next_message() == (f"edged/v1/dev-a/{channel}", b"x")


async def test_device_cannot_publish_outside_its_own_uplink(
    admin: DynsecAdmin, peer: Login
) -> None:
    """Any other topic gets PUBACK 0x87 Not authorized and never reaches a subscriber."""
    await admin.grant_device("dev-a", "pw-a")
    await admin.grant_device("dev-b", "pw-b")
    sub = await ingest(peer)
    dev = await device(peer, "dev-a", "pw-a")
    for topic in (
        "edged/v1/dev-b/telemetry",
        "edged/v1/dev-b/state",
        "edged/v1/dev-a/cmd/reboot",
        "edged/v1/dev-a/other",
        "edged/v1/dev-a",
        "elsewhere",
    ):
        assert await dev.publish(topic) == NOT_AUTHORIZED, topic
    assert await dev.publish("edged/v1/dev-a/events", b"after") == 0
    assert await sub.next_message() == ("edged/v1/dev-a/events", b"after")  # nothing before it


async def test_last_will_is_published_on_the_own_state_topic_only(
    admin: DynsecAdmin, peer: Login
) -> None:
    """A will on the device's own state topic is published; one on another's is dropped."""
    await admin.grant_device("dev-a", "pw-a")
    await admin.grant_device("dev-b", "pw-b")
    sub = await ingest(peer)
    for will, device_id in (("edged/v1/dev-b/state", "dev-a"), ("edged/v1/dev-b/state", "dev-b")):
        dev = await device(peer, device_id, f"pw-{device_id[-1]}", will=will)
        dev.abort()
        await asyncio.wait_for(dev.disconnected.wait(), WAIT)
    assert await sub.next_message() == ("edged/v1/dev-b/state", b"dev-b offline")
    assert await sub.publish("edged/v1/dev-a/cmd/after") == 0
    assert await sub.next_message() == ("edged/v1/dev-a/cmd/after", b"x")


async def test_device_subscribes_to_its_own_commands_only(admin: DynsecAdmin, peer: Login) -> None:
    """A device subscribes to its own commands only; the admin sends commands, forges no uplink."""
    await admin.grant_device("dev-a", "pw-a")
    dev = await device(peer, "dev-a", "pw-a")
    for refused in ("edged/v1/dev-b/cmd/#", "edged/v1/+/cmd/#", "edged/v1/dev-a/telemetry", "#"):
        assert await dev.subscribe(refused) == NOT_AUTHORIZED, refused
    assert await dev.subscribe("edged/v1/dev-a/cmd/#") == 1
    control = await ingest(peer)
    assert await control.publish("edged/v1/dev-a/cmd/reboot", b"now") == 0
    assert await dev.next_message() == ("edged/v1/dev-a/cmd/reboot", b"now")
    assert await control.publish("edged/v1/dev-a/telemetry") == NOT_AUTHORIZED


async def test_wrong_password_unknown_user_and_anonymous_are_refused(
    admin: DynsecAdmin, peer: Login
) -> None:
    """A wrong password, an unknown username and no username are refused at CONNECT."""
    await admin.grant_device("dev-a", "pw-a")
    assert (await peer("dev-a", "wrong", client_id="dev-a")).connack == BAD_CREDENTIALS
    assert (await peer("dev-z", "pw-a", client_id="dev-z")).connack == BAD_CREDENTIALS
    assert (await peer(None, None)).connack == NOT_AUTHORIZED


async def test_device_cannot_take_over_another_client_id(admin: DynsecAdmin, peer: Login) -> None:
    """A device's account connects under its own client id only, so it cannot kick another."""
    await admin.grant_device("dev-a", "pw-a")
    await admin.grant_device("dev-b", "pw-b")
    b = await device(peer, "dev-b", "pw-b")
    assert (await peer("dev-a", "pw-a", client_id="dev-b")).connack == BAD_CREDENTIALS
    assert await b.publish("edged/v1/dev-b/telemetry") == NO_SUBSCRIBERS
    assert not b.disconnected.is_set()


async def test_revoke_disconnects_the_device_and_locks_it_out(
    admin: DynsecAdmin, peer: Login
) -> None:
    """Revoking kicks the live session, locks the password out and deletes client and role."""
    await admin.grant_device("dev-a", "pw-a")
    dev = await device(peer, "dev-a", "pw-a")
    await admin.revoke_device("dev-a")
    await asyncio.wait_for(dev.disconnected.wait(), WAIT)
    assert dev.disconnect_reason is not None
    assert dev.disconnect_reason.value == ADMINISTRATIVE_ACTION
    assert (await peer("dev-a", "pw-a", client_id="dev-a")).connack == BAD_CREDENTIALS
    client, role = await admin.execute(
        {"command": "getClient", "username": "dev-a"},
        {"command": "getRole", "rolename": role_name("dev-a")},
    )
    assert (client["error"], role["error"]) == ("Client not found", "Role not found")


async def test_disable_disconnects_and_enable_restores(admin: DynsecAdmin, peer: Login) -> None:
    """Disabling kicks the device and refuses it; enabling lets the same password in again."""
    await admin.grant_device("dev-a", "pw-a")
    dev = await device(peer, "dev-a", "pw-a")
    await admin.disable_device("dev-a")
    await asyncio.wait_for(dev.disconnected.wait(), WAIT)
    assert (await peer("dev-a", "pw-a", client_id="dev-a")).connack != 0
    await admin.enable_device("dev-a")
    await device(peer, "dev-a", "pw-a")


async def test_grant_is_idempotent_and_resets_the_password(admin: DynsecAdmin, peer: Login) -> None:
    """Granting again keeps one role and its ACLs; a new password kicks and replaces the old."""
    await admin.grant_device("dev-a", "pw-a")
    await admin.grant_device("dev-a", "pw-a")
    client, role = await admin.execute(
        {"command": "getClient", "username": "dev-a"},
        {"command": "getRole", "rolename": "device-dev-a"},
    )
    assert client["data"]["client"]["roles"] == [{"rolename": "device-dev-a"}]
    assert client["data"]["client"]["clientid"] == "dev-a"
    acls = [{k: a[k] for k in ("acltype", "topic", "allow")} for a in role["data"]["role"]["acls"]]
    assert sorted(acls, key=str) == sorted(device_acls("dev-a"), key=str)
    dev = await device(peer, "dev-a", "pw-a")
    await admin.grant_device("dev-a", "pw-new")
    await asyncio.wait_for(dev.disconnected.wait(), WAIT)
    assert (await peer("dev-a", "pw-a", client_id="dev-a")).connack == BAD_CREDENTIALS
    await device(peer, "dev-a", "pw-new")


async def test_grant_repairs_a_tampered_account(admin: DynsecAdmin, peer: Login) -> None:
    """Granting again undoes an ACL, a role, a group and a disable added by hand."""
    await admin.grant_device("dev-a", "pw-a")
    await admin.grant_device("dev-b", "pw-b")
    tampering = await admin.execute(
        {"command": "addRoleACL", "rolename": "device-dev-a", "acltype": "publishClientSend",
         "topic": "edged/v1/dev-b/telemetry", "allow": True},
        {"command": "removeRoleACL", "rolename": "device-dev-a", "acltype": "publishClientSend",
         "topic": "edged/v1/dev-a/state"},
        {"command": "addClientRole", "username": "dev-a", "rolename": ADMIN_ROLE},
        {"command": "createGroup", "groupname": "extra", "roles": [{"rolename": "device-dev-b"}]},
        {"command": "addGroupClient", "groupname": "extra", "username": "dev-a"},
        {"command": "disableClient", "username": "dev-a"},
    )  # fmt: skip
    assert [r.get("error") for r in tampering] == [None] * 6
    await admin.grant_device("dev-a", "pw-a")
    dev = await device(peer, "dev-a", "pw-a")
    assert await dev.publish("edged/v1/dev-b/telemetry") == NOT_AUTHORIZED
    assert await dev.publish("edged/v1/dev-a/state") == NO_SUBSCRIBERS
    (client,) = await admin.execute({"command": "getClient", "username": "dev-a"})
    assert client["data"]["client"]["roles"] == [{"rolename": "device-dev-a"}]
    assert client["data"]["client"]["groups"] == []


async def test_unknown_devices_revoke_and_disable_fine_enable_fails(admin: DynsecAdmin) -> None:
    """Revoking or disabling an unknown device is fine; enabling one is a BrokerAdminError."""
    await admin.revoke_device("dev-unknown")
    await admin.disable_device("dev-unknown")
    with pytest.raises(BrokerAdminError, match="'dev-unknown' has no broker account"):
        await admin.enable_device("dev-unknown")


async def test_bad_requests_are_refused_before_reaching_the_broker(admin: DynsecAdmin) -> None:
    """A malformed device id, the admin's own name or an empty password is a BrokerAdminError."""
    with pytest.raises(BrokerAdminError, match="not 1-64 characters"):
        await admin.grant_device("dev/+", "pw")
    with pytest.raises(BrokerAdminError, match="is the broker admin's username"):
        await admin.revoke_device(ADMIN)
    with pytest.raises(BrokerAdminError, match="password for 'dev-a' is empty"):
        await admin.grant_device("dev-a", "")


async def test_plugin_refusals_are_broker_admin_errors(dynsec_broker: MosquittoBroker) -> None:
    """Logins the broker refuses and a missing admin ACL surface as BrokerAdminError sentences."""
    host, port = dynsec_broker.host, dynsec_broker.port
    with pytest.raises(BrokerAdminError, match="refused the admin login 'edged-control-plane'"):
        async with DynsecAdmin(host, port, ADMIN, "wrong"):
            pass
    async with DynsecAdmin(host, port, ADMIN, ADMIN_PASSWORD) as admin:
        await admin.grant_device("dev-a", "pw-a")
        (created,) = await admin.execute(
            {"command": "createClient", "username": "nobody", "password": "pw"}
        )
        assert "error" not in created
    with pytest.raises(BrokerAdminError, match="refused the admin login 'dev-a': Not authorized"):
        async with DynsecAdmin(host, port, "dev-a", "pw-a"):
            pass
    with pytest.raises(BrokerAdminError, match=r"may not subscribe to \$CONTROL/dynamic-security"):
        async with DynsecAdmin(host, port, "nobody", "pw"):
            pass


async def test_broker_without_the_plugin_times_out(
    broker_factory: Callable[..., MosquittoBroker],
) -> None:
    """Without the plugin nothing answers: a BrokerAdminError after the timeout."""
    plain = broker_factory()
    async with DynsecAdmin(plain.host, plain.port, ADMIN, "any", timeout=0.3) as admin:
        with pytest.raises(BrokerAdminError, match="did not answer getClient, getRole within"):
            await admin.grant_device("dev-a", "pw-a")


async def test_nothing_listening_is_a_broker_admin_error(
    broker_factory: Callable[..., MosquittoBroker],
) -> None:
    """An admin session with a stopped broker fails as BrokerAdminError at once."""
    stopped = broker_factory()
    stopped.kill()
    with pytest.raises(BrokerAdminError, match=r"cannot (connect to|reach) the broker"):
        async with DynsecAdmin(stopped.host, stopped.port, ADMIN, ADMIN_PASSWORD):
            pass


async def test_admin_session_survives_a_broker_restart(
    dynsec_broker: MosquittoBroker, admin: DynsecAdmin, peer: Login
) -> None:
    """After a broker crash and restart the admin reconnects and earlier grants still work."""
    await admin.grant_device("dev-a", "pw-a")
    dynsec_broker.kill()
    dynsec_broker.start()
    await admin.grant_device("dev-b", "pw-b")  # waits for paho's reconnect (about 1 s)
    await device(peer, "dev-a", "pw-a")
    await device(peer, "dev-b", "pw-b")


async def test_bootstrap_keeps_devices_and_rotates_the_admin_password(
    mosquitto_binary: str, dynsec_broker: MosquittoBroker, peer: Login
) -> None:
    """Bootstrapping again keeps devices, rotates the admin password, enforces default deny."""
    host, port = dynsec_broker.host, dynsec_broker.port
    async with DynsecAdmin(host, port, ADMIN, ADMIN_PASSWORD) as admin:
        await admin.grant_device("dev-a", "pw-a")
    dynsec_broker.stop()
    again = MosquittoBroker(
        binary=mosquitto_binary,
        workdir=dynsec_broker.workdir,
        port=port,
        dynsec=DynsecBootstrap(ADMIN, "rotated"),
    )
    with again:
        state = json.loads((dynsec_broker.workdir / DYNSEC_FILE).read_text())
        assert state["defaultACLAccess"] == DEFAULT_ACL_ACCESS
        await device(peer, "dev-a", "pw-a")
        with pytest.raises(BrokerAdminError, match="refused the admin login"):
            async with DynsecAdmin(host, port, ADMIN, ADMIN_PASSWORD):
                pass
        async with DynsecAdmin(host, port, ADMIN, "rotated") as admin:
            await admin.revoke_device("dev-a")


async def test_null_admin_only_checks_device_ids() -> None:
    """The development admin does nothing but still refuses malformed device ids."""
    async with NullBrokerAdmin() as admin:
        await admin.grant_device("dev-a", "pw")
        await admin.disable_device("dev-a")
        await admin.enable_device("dev-a")
        await admin.revoke_device("dev-a")
        with pytest.raises(BrokerAdminError):
            await admin.revoke_device("DEV A")


async def test_unreadable_ca_file_is_a_broker_admin_error(tmp_path: Path) -> None:
    """A CA file that cannot be loaded is a BrokerAdminError before any connection."""
    missing = str(tmp_path / "missing-ca.pem")
    with pytest.raises(BrokerAdminError, match="cannot load the CA file"):
        async with DynsecAdmin("127.0.0.1", 1, ADMIN, ADMIN_PASSWORD, ca_file=missing):
            pass
