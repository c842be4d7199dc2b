"""Per-device broker credentials, managed through Mosquitto's dynamic security plugin.

    async with DynsecAdmin(host, port, "admin", admin_password) as admin:
        await admin.grant_device("dev-1a2b", password)   # account + role; again: new password
        await admin.disable_device("dev-1a2b")            # kicked, cannot log in, account kept
        await admin.enable_device("dev-1a2b")
        await admin.revoke_device("dev-1a2b")             # kicked, account and role deleted

Device `<id>` gets the client `<id>` (username and the only client id it may connect with, so
no device can take over another's session) holding the role `device-<id>`, which allows:

    publishClientSend      edged/v1/<id>/events, .../telemetry, .../samples, .../state
    subscribePattern       edged/v1/<id>/cmd/#
    publishClientReceive   edged/v1/<id>/cmd/#

and nothing else (the bootstrap's default ACL access denies everything a role does not allow;
see control_plane.local_broker). On Mosquitto 2.0.11 deleting, disabling, re-passwording or
re-binding an account disconnects its live session ("Administrative action") before the
plugin answers; ACL edits apply to live sessions without disconnecting them.

Commands are JSON on `$CONTROL/dynamic-security/v1`; the plugin answers on `.../response`,
echoing each command's `correlationData`, which is how concurrent admins (several control
plane replicas) tell their answers apart. Anything that goes wrong becomes one
BrokerAdminError sentence. Passwords travel inside the commands: use TLS to a remote broker.

`NullBrokerAdmin` is for a broker without the plugin (the anonymous development broker): every
call does nothing, so any client may publish anything. Never use it in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from control_plane.errors import BrokerAdminError

__all__ = [
    "COMMAND_TOPIC",
    "RESPONSE_TOPIC",
    "BrokerAdmin",
    "DynsecAdmin",
    "NullBrokerAdmin",
    "device_acls",
    "grant_commands",
    "role_name",
]

log = logging.getLogger(__name__)

COMMAND_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{COMMAND_TOPIC}/response"
TOPIC_ROOT = "edged/v1"
UPLINK_CHANNELS = ("events", "telemetry", "samples", "state")
_DEVICE = re.compile(r"^[a-z0-9-]{1,64}$")

Command = dict[str, Any]
Response = dict[str, Any]


# -- the pure part: which commands bring the broker to the wanted state ----------------------


def _check_device_id(device_id: str, admin: str | None = None) -> None:
    if not isinstance(device_id, str) or not _DEVICE.fullmatch(device_id):
        raise BrokerAdminError(f"device id {device_id!r} is not 1-64 characters of a-z, 0-9, '-'")
    if device_id == admin:
        raise BrokerAdminError(f"device id {device_id!r} is the broker admin's username")


def role_name(device_id: str) -> str:
    """The role holding a device's ACLs: `device-<id>`."""
    _check_device_id(device_id)
    return f"device-{device_id}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """The ACLs of a device's role, in the plugin's JSON form."""
    _check_device_id(device_id)
    base = f"{TOPIC_ROOT}/{device_id}"
    acls = [("publishClientSend", f"{base}/{channel}") for channel in UPLINK_CHANNELS]
    acls += [("subscribePattern", f"{base}/cmd/#"), ("publishClientReceive", f"{base}/cmd/#")]
    return [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in acls]


def grant_commands(
    device_id: str,
    password: str,
    client: Mapping[str, Any] | None,
    role: Mapping[str, Any] | None,
) -> list[Command]:
    """The commands that give `device_id` exactly its account and role with `password`, given
    what the plugin's getClient and getRole returned (None: not found). An existing role has
    its ACLs corrected; an existing client gets the password, its client id binding and the
    role, is enabled, and loses every other role and group."""
    rolename = role_name(device_id)
    wanted = device_acls(device_id)
    commands: list[Command] = []
    if role is None:
        commands.append({"command": "createRole", "rolename": rolename, "acls": wanted})
    else:
        have = [
            {"acltype": a.get("acltype"), "topic": a.get("topic"), "allow": a.get("allow")}
            for a in role.get("acls", [])
        ]
        commands += [
            {"command": "removeRoleACL", "rolename": rolename, "acltype": a["acltype"],
             "topic": a["topic"]}
            for a in have if a not in wanted
        ]  # fmt: skip
        commands += [
            {"command": "addRoleACL", "rolename": rolename, **a} for a in wanted if a not in have
        ]
    if client is None:
        commands.append({
            "command": "createClient", "username": device_id, "password": password,
            "clientid": device_id, "roles": [{"rolename": rolename}],
        })  # fmt: skip
        return commands
    commands.append({"command": "setClientPassword", "username": device_id, "password": password})
    if client.get("clientid") != device_id:
        commands.append({"command": "setClientId", "username": device_id, "clientid": device_id})
    roles = [r.get("rolename") for r in client.get("roles", [])]
    commands += [
        {"command": "removeClientRole", "username": device_id, "rolename": other}
        for other in roles if other != rolename
    ]  # fmt: skip
    if rolename not in roles:
        commands.append({"command": "addClientRole", "username": device_id, "rolename": rolename})
    commands += [
        {"command": "removeGroupClient", "groupname": g.get("groupname"), "username": device_id}
        for g in client.get("groups", [])
    ]
    if client.get("disabled"):
        commands.append({"command": "enableClient", "username": device_id})
    return commands


class _Dropped(BrokerAdminError):
    """The connection ended under a command: it may or may not have been carried out."""


def _not_found(response: Response) -> bool:
    return "not found" in str(response.get("error", "")).lower()


def _found(response: Response, key: str) -> dict[str, Any] | None:
    """The `data.<key>` of a getClient/getRole answer, None if the plugin has no such thing."""
    if _not_found(response):
        return None
    _check(response)
    found = response.get("data", {}).get(key)
    if not isinstance(found, dict):
        raise BrokerAdminError(f"the broker answered {response.get('command')} without a {key}")
    return found


def _check(response: Response, device_id: str = "", *, missing_ok: bool = False) -> None:
    """BrokerAdminError naming the command, the device and the plugin's error, if any."""
    error = response.get("error")
    if error is None or (missing_ok and _not_found(response)):
        return
    subject = f" for device {device_id!r}" if device_id else ""
    raise BrokerAdminError(f"the broker refused {response.get('command')}{subject}: {error}")


# -- the interface ---------------------------------------------------------------------------


class BrokerAdmin(Protocol):
    """What the control plane needs from the broker: per-device credentials."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def grant_device(self, device_id: str, password: str) -> None:
        """Create the device's account and role, or reset them (new password, ACLs, enabled);
        a live session is disconnected when the account already existed."""

    async def revoke_device(self, device_id: str) -> None:
        """Delete the account and role, disconnecting a live session; unknown is fine."""

    async def disable_device(self, device_id: str) -> None:
        """Refuse logins and disconnect a live session, keeping the account; unknown is fine."""

    async def enable_device(self, device_id: str) -> None:
        """Accept logins again; BrokerAdminError if the device has no account."""


class NullBrokerAdmin:
    """No broker credentials at all, for an anonymous development broker: every device (and
    anyone else) can publish anything. Insecure; development and tests only."""

    async def __aenter__(self) -> Self:
        log.warning("broker credentials are not managed: any client may use any topic (dev only)")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def grant_device(self, device_id: str, password: str) -> None:
        _check_device_id(device_id)

    async def revoke_device(self, device_id: str) -> None:
        _check_device_id(device_id)

    async def disable_device(self, device_id: str) -> None:
        _check_device_id(device_id)

    async def enable_device(self, device_id: str) -> None:
        _check_device_id(device_id)


# -- the real one ----------------------------------------------------------------------------


class DynsecAdmin:
    """A long-lived MQTT 5 session with the admin account. When it drops, a supervisor task
    reconnects with jittered exponential backoff (0.2 s doubling to 30 s) and subscribes to
    the answers again; a command issued meanwhile waits for that within `timeout`. An
    operation the drop cut off is run again (they are idempotent), three tries in all.
    Operations run one at a time. TLS is on when `ca_file` is set or `tls` is true (then with
    the system's trust store)."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        tls: bool = False,
        ca_file: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.host, self.port, self.username = host, port, username
        self._password = password
        self.tls, self.ca_file, self.timeout = tls, ca_file, timeout
        self._client_id = f"edged-admin-{uuid.uuid4().hex[:12]}"
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None  # the current connection's
        self._login: asyncio.Future[None] | None = None  # its outcome: logged in and subscribed
        self._subscribe_mid: int | None = None
        self._ready = asyncio.Event()  # logged in and subscribed to the answers
        self._lost = asyncio.Event()  # the current connection ended
        self._supervisor: asyncio.Task[None] | None = None
        self._answers: dict[str, asyncio.Future[list[Response]]] = {}
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # never the password
        return f"DynsecAdmin({self.host!r}, {self.port}, username={self.username!r})"

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Log in and subscribe to the plugin's answers; BrokerAdminError if that fails."""
        self._loop = asyncio.get_running_loop()
        if self.tls or self.ca_file:
            try:
                self._tls = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerAdminError(f"cannot load the CA file {self.ca_file}: {exc}") from exc
        await self._connect()
        self._supervisor = self._loop.create_task(self._supervise(), name="dynsec-admin")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await self._drop()
        self._fail_waiting(BrokerAdminError(f"the admin session with {self._where} was closed"))

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            await self._drop()
            retrying = AsyncRetrying(
                wait=wait_random_exponential(multiplier=0.2, max=30),
                retry=retry_if_exception_type(BrokerAdminError),
                before_sleep=lambda state: log.warning(
                    "broker admin: %s; retrying", state.outcome and state.outcome.exception()
                ),
            )
            async for attempt in retrying:
                with attempt:
                    await self._connect()

    async def _connect(self) -> None:
        """One connection: TCP (and TLS), CONNACK, SUBACK for the answers, within `timeout`."""
        assert self._loop is not None
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,  # reconnecting is `_supervise`'s job
        )
        client.username_pw_set(self.username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        # paho's thread -> the event loop, through `_threadsafe` only; events of a previous
        # connection's client are ignored there.
        client.on_connect = lambda c, _u, _f, rc, _p: self._threadsafe(c, self._on_connect, rc)
        client.on_disconnect = lambda c, _u, _f, rc, _p: self._threadsafe(
            c, self._on_disconnect, rc
        )
        client.on_subscribe = lambda c, _u, mid, rcs, _p: self._threadsafe(
            c, self._on_subscribe, mid, rcs
        )
        client.on_publish = lambda c, _u, mid, rc, _p: self._threadsafe(
            c, self._on_publish, mid, rc
        )
        client.on_message = lambda c, _u, msg: self._threadsafe(c, self._on_message, msg.payload)
        self._client, self._login = client, self._loop.create_future()
        self._lost.clear()
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    await asyncio.to_thread(client.connect, self.host, self.port, 30)
                except OSError as exc:
                    raise BrokerAdminError(
                        f"cannot connect to the broker at {self._where}: {exc}"
                    ) from exc
                client.loop_start()
                await asyncio.shield(self._login)
        except BaseException as exc:
            await self._drop()
            if isinstance(exc, TimeoutError):
                raise BrokerAdminError(
                    f"the broker at {self._where} did not accept the admin login within "
                    f"{self.timeout:g} s"
                ) from None
            raise

    async def _drop(self) -> None:
        """End the current connection, if any, and paho's thread with it."""
        client, self._client = self._client, None
        self._ready.clear()
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    def _threadsafe(self, client: paho.Client, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._current, client, callback, *args)

    def _current(self, client: paho.Client, callback: Any, *args: Any) -> None:
        if client is self._client:
            callback(*args)

    # -- paho's events, on the event loop ----------------------------------------------------

    def _settle_login(self, error: str | None) -> None:
        if self._login is not None and not self._login.done():
            if error is None:
                self._login.set_result(None)
            else:
                self._login.set_exception(BrokerAdminError(error))

    def _on_connect(self, reason: ReasonCode) -> None:
        if reason.is_failure:
            who = f"the broker at {self._where} refused the admin login {self.username!r}"
            self._settle_login(f"{who}: {reason}")
        elif self._client is not None:
            self._subscribe_mid = self._client.subscribe(RESPONSE_TOPIC, qos=1)[1]

    def _on_subscribe(self, mid: int, reasons: list[ReasonCode]) -> None:
        if mid != self._subscribe_mid:
            return
        if reasons and reasons[0].is_failure:
            who = f"the admin {self.username!r} may not subscribe to {RESPONSE_TOPIC}"
            self._settle_login(f"{who}: {reasons[0]}")
            return
        self._ready.set()
        self._settle_login(None)

    def _on_disconnect(self, reason: ReasonCode) -> None:
        self._ready.clear()
        self._lost.set()
        self._settle_login(f"the broker at {self._where} closed the admin session: {reason}")
        self._fail_waiting(_Dropped(f"the admin session with {self._where} dropped ({reason})"))

    def _on_publish(self, mid: int, reason: ReasonCode) -> None:
        ack = self._acks.pop(mid, None)
        if ack is None or ack.done():
            return
        if reason.is_failure:
            ack.set_exception(
                BrokerAdminError(f"the broker refused the admin's command message: {reason}")
            )
        else:
            ack.set_result(None)

    def _on_message(self, payload: bytes) -> None:
        try:
            responses = json.loads(payload)["responses"]
            tag = str(responses[0]["correlationData"]).split(":", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError):
            return  # not an answer to one of ours
        answer = self._answers.pop(tag, None)
        if answer is not None and not answer.done():
            answer.set_result(responses)

    def _fail_waiting(self, error: BrokerAdminError) -> None:
        waiting: list[asyncio.Future[Any]] = [*self._answers.values(), *self._acks.values()]
        self._answers.clear()
        self._acks.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    # -- commands ----------------------------------------------------------------------------

    async def execute(self, *commands: Mapping[str, Any]) -> list[Response]:
        """Send plugin commands in one message and return the plugin's answers in order,
        unchecked (an answer with an `error` is returned, not raised). BrokerAdminError when
        there is no answer within `timeout`."""
        if self._supervisor is None or self._loop is None:
            raise BrokerAdminError("the broker admin is not open (use `async with`)")
        if not commands:
            return []
        names = ", ".join(str(c.get("command")) for c in commands)
        tag = uuid.uuid4().hex
        body = [{**c, "correlationData": f"{tag}:{i}"} for i, c in enumerate(commands)]
        try:
            async with asyncio.timeout(self.timeout):
                while not self._ready.is_set():  # reconnecting
                    await self._ready.wait()
                assert self._client is not None  # whenever ready
                answer = self._loop.create_future()
                self._answers[tag] = answer
                info = self._client.publish(COMMAND_TOPIC, json.dumps({"commands": body}), qos=1)
                if info.rc == paho.MQTT_ERR_NO_CONN:  # paho saw the drop; its event is coming
                    self._ready.clear()
                    raise _Dropped(f"the admin session with {self._where} dropped")
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    raise BrokerAdminError(
                        f"cannot send {names} to the broker: {paho.error_string(info.rc)}"
                    )
                ack = self._loop.create_future()
                self._acks[info.mid] = ack
                await ack
                responses = await answer
        except TimeoutError:
            raise BrokerAdminError(
                f"the broker at {self._where} did not answer {names} within {self.timeout:g} s "
                "(not connected, or no dynamic security plugin)"
            ) from None
        finally:
            self._answers.pop(tag, None)
        if len(responses) != len(commands):
            raise BrokerAdminError(
                f"the broker answered {len(responses)} of {len(commands)} commands ({names})"
            )
        return [dict(r) for r in responses]

    async def _checked(self, device_id: str, *commands: Command, missing_ok: bool = False) -> None:
        for response in await self.execute(*commands):
            _check(response, device_id, missing_ok=missing_ok)

    async def _idempotent(self, operation: Callable[[], Awaitable[None]]) -> None:
        """Run an idempotent operation, again (up to twice more) if the connection dropped
        under it: whether the broker acted on an unacknowledged command is unknown."""
        async with self._lock:
            for attempt in range(3):
                try:
                    return await operation()
                except _Dropped as exc:
                    log.info("broker admin: %s; repeating the operation", exc)
                    if attempt == 2:
                        raise

    async def grant_device(self, device_id: str, password: str) -> None:
        """Create the device's account and role, or reset them (new password, ACLs, enabled);
        a live session is disconnected when the account already existed."""
        _check_device_id(device_id, self.username)
        rolename = role_name(device_id)
        if not isinstance(password, str) or not password:
            raise BrokerAdminError(f"the broker password for {device_id!r} is empty")

        async def grant() -> None:
            client_answer, role_answer = await self.execute(
                {"command": "getClient", "username": device_id},
                {"command": "getRole", "rolename": rolename},
            )
            client = _found(client_answer, "client")
            role = _found(role_answer, "role")
            await self._checked(device_id, *grant_commands(device_id, password, client, role))

        await self._idempotent(grant)
        log.info("broker account for device %s granted", device_id)

    async def revoke_device(self, device_id: str) -> None:
        """Delete the account and role, disconnecting a live session; unknown is fine."""
        _check_device_id(device_id, self.username)
        commands = (
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": role_name(device_id)},
        )
        await self._idempotent(lambda: self._checked(device_id, *commands, missing_ok=True))
        log.info("broker account for device %s revoked", device_id)

    async def disable_device(self, device_id: str) -> None:
        """Refuse logins and disconnect a live session, keeping the account; unknown is fine."""
        _check_device_id(device_id, self.username)
        command = {"command": "disableClient", "username": device_id}
        await self._idempotent(lambda: self._checked(device_id, command, missing_ok=True))
        log.info("broker account for device %s disabled", device_id)

    async def enable_device(self, device_id: str) -> None:
        """Accept logins again; BrokerAdminError if the device has no account."""
        _check_device_id(device_id, self.username)

        async def enable() -> None:
            (answer,) = await self.execute({"command": "enableClient", "username": device_id})
            if _not_found(answer):
                raise BrokerAdminError(
                    f"device {device_id!r} has no broker account: grant it first"
                )
            _check(answer, device_id)

        await self._idempotent(enable)
        log.info("broker account for device %s enabled", device_id)
