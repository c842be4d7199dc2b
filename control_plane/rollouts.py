"""The rollout engine: a periodic task in the app's lifespan that reads the devices' ota.*
reports from the `events` table, updates each active rollout's per-device state, applies the
plan (control_plane.rollout_plan) and tells newly assigned devices over MQTT.

    async with MqttNotifier(login) as notifier:
        async with RolloutEngine(db, settings, notifier=notifier) as engine:
            engine.wake()      # act now (after an operator's change) instead of at the tick

Each tick reads the ota.* events received since its last read, less `rollout_event_lag_s`
(ingest's transactions may commit out of receipt order); a report is applied once, by its
device's (boot, seq), so reading one twice changes nothing. Each rollout is then decided and
written in a transaction of its own; the row's version counter makes a concurrent change (an
operator's action, another replica's tick) fail this one, which the next tick redoes.
Automatic actions (advance, await approval, pause, rollback, complete) land in the audit log
with actor "system" in the same transaction.

After the commit every newly assigned device gets `{"rollout": "<id>"}` with QoS 1 on
`edged/v1/<device id>/cmd/update` (the broker role of the control plane may publish on
`edged/v1/+/cmd/#`). A notification only means "ask now": devices also poll
`GET /v1/device/self/update` on a slow timer, so one that is lost strands nobody. The same
notifier carries the other commands (`MqttNotifier.publish`: cmd/personalisation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from control_plane.db.engine import Database
from control_plane.db.models import AuditEntry, Event
from control_plane.db.rollouts import Rollout, RolloutDevice
from control_plane.rollout_plan import (
    ACTIVE,
    FIGURES,
    Criteria,
    Decision,
    OtaEvent,
    Progress,
    RolloutState,
    Stage,
    Target,
    apply_event,
    decide,
)
from control_plane.settings import Settings

__all__ = [
    "SYSTEM",
    "BrokerLogin",
    "MqttNotifier",
    "RolloutEngine",
    "audit_system",
    "release",
    "rollout_state",
]

log = logging.getLogger("control_plane.rollouts")
SYSTEM = "system"
PAGE = 2000
COMMAND_TOPIC = "edged/v1/{}/cmd/{}"


class BrokerLogin(Protocol):
    """Where and as whom the control plane reaches the broker (an IngestConfig will do)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def tls(self) -> bool: ...
    @property
    def ca_file(self) -> str | None: ...


class MqttNotifier:
    """One MQTT 5 client per replica for commands to devices (`cmd/update`,
    `cmd/personalisation`). paho's own thread keeps the connection (reconnecting with backoff)
    and resends unacknowledged QoS 1 messages after a reconnect; a command published while the
    broker is away waits in paho's queue, and never fails the caller."""

    def __init__(self, login: BrokerLogin) -> None:
        self.login = login
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edged-commands-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        if login.username is not None:
            self._client.username_pw_set(login.username, login.password)
        if login.tls or login.ca_file:
            self._client.tls_set(ca_certs=login.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self._client.reconnect_delay_set(1, 30)

    async def __aenter__(self) -> Self:
        self._client.connect_async(self.login.host, self.login.port, keepalive=30)
        self._client.loop_start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    def publish(self, device_id: str, command: str, payload: bytes) -> None:
        """`payload` on `edged/v1/<device_id>/cmd/<command>`, QoS 1; never raises for a broker
        that is away (the device's poll covers a command that does not arrive)."""
        info = self._client.publish(COMMAND_TOPIC.format(device_id, command), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.info(
                "%s command to %s queued (%s); its poll covers it",
                command,
                device_id,
                mqtt.error_string(info.rc),
            )

    def notify(self, rollout_id: str, device_ids: Sequence[str]) -> None:
        """Tell each device to ask for its update now."""
        payload = json.dumps({"rollout": rollout_id}).encode()
        for device_id in device_ids:
            self.publish(device_id, "update", payload)


# -- rows <-> plan values ----------------------------------------------------------------------


def rollout_state(row: Rollout) -> RolloutState:
    """The plan's view of a rollout row."""
    return RolloutState(
        status=row.status,  # type: ignore[arg-type]
        stages=tuple(Stage(**s) for s in row.stages),
        criteria=Criteria(**row.criteria),
        on_failure="rollback" if row.on_failure == "rollback" else "pause",
        stage=row.stage,
        approved_through=row.approved_through,
        accepted_through=row.accepted_through,
        stage_started_at=row.stage_started_at,
    )


def _progress(row: RolloutDevice) -> Progress:
    last = (row.last_boot, row.last_seq) if row.last_boot is not None else None
    return Progress(
        device_id=row.device_id,
        stage=row.stage,
        state=row.state,  # type: ignore[arg-type]
        last=last,  # type: ignore[arg-type]
        event=row.last_event,
        at=row.updated_at,
        reason=row.reason,
        figures=dict(row.figures or {}),
        progressed=row.progressed,
    )


def _store(row: RolloutDevice, progress: Progress) -> None:
    row.state = progress.state
    row.last_boot, row.last_seq = progress.last if progress.last else (None, None)
    row.last_event = progress.event
    row.updated_at = progress.at
    row.reason = progress.reason[:500] if progress.reason else None
    row.figures = dict(progress.figures)
    row.progressed = progress.progressed


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def ota_event(
    device_id: str, boot: int, seq: int, name: str, received_at: float, body: dict[str, Any]
) -> OtaEvent:
    """A stored event as the plan reads it; only finite numbers count as figures."""
    figures = {
        k: float(v)
        for k in FIGURES
        if isinstance(v := body.get(k), int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }
    return OtaEvent(
        device_id,
        boot,
        seq,
        name,
        received_at,
        target=_text(body.get("target"), 200),
        version=_text(body.get("version"), 64),
        reason=_text(body.get("reason"), 500),
        figures=figures,
    )


def audit_system(session: AsyncSession, action: str, rollout_id: str, **detail: Any) -> None:
    """An automatic action, in the caller's transaction."""
    session.add(
        AuditEntry(
            at=time.time(),
            actor=SYSTEM,
            role=None,
            action=action,
            target=rollout_id,
            outcome="ok",
            source=None,
            detail=detail,
        )
    )


async def release(session: AsyncSession, rollout_id: str) -> None:
    """The rollout's devices may join another rollout (it completed, rolled back, aborted)."""
    await session.execute(
        update(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout_id)
        .values(active_device_id=None)
    )


def _history(row: Rollout, event: str, now: float, **detail: Any) -> None:
    row.history = [*row.history, {"at": now, "event": event, "by": SYSTEM, **detail}]


# -- the engine --------------------------------------------------------------------------------


class RolloutEngine:
    """`async with` runs the periodic task; `notifier` (entered by its owner, None: devices
    rely on their poll) tells newly assigned devices."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        notifier: MqttNotifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.clock = db, clock
        self.tick_s, self.lag_s = settings.rollout_tick_s, settings.rollout_event_lag_s
        self.notifier = notifier
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._read_to: float | None = None  # events received before this were read

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="rollout-engine")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        """Tick now rather than at the next period (an operator changed a rollout)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the database may be away; the next tick tries again
                log.exception("rollout tick failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> None:
        """Read new ota.* reports, then decide and write every active rollout."""
        now = self.clock()
        async with self.db.session() as session:
            active = list(
                await session.execute(
                    select(Rollout.id, Rollout.event_cursor).where(Rollout.status.in_(ACTIVE))
                )
            )
        if not active:
            self._read_to = now
            return
        start = self._read_to if self._read_to is not None else min(c for _, c in active)
        events = await self._read_events(start - self.lag_s, {i for i, _ in active})
        complete = True
        for rollout_id, _ in active:
            try:
                assigned = await self._step(rollout_id, events.get(rollout_id, []), now)
            except StaleDataError:
                log.info("rollout %s changed during the tick; the next one redoes it", rollout_id)
                complete = False
                continue
            except Exception:  # one rollout's trouble must not hold up the others
                log.exception("rollout %s: tick failed", rollout_id)
                complete = False
                continue
            if assigned and self.notifier is not None:
                self.notifier.notify(rollout_id, assigned)
        if complete:  # else the next tick reads these events again
            self._read_to = now

    async def _read_events(self, since: float, rollouts: set[str]) -> dict[str, list[OtaEvent]]:
        """ota.* events received after `since` that name one of `rollouts`, keyset-paged."""
        out: dict[str, list[OtaEvent]] = defaultdict(list)
        key = tuple_(Event.received_at, Event.device_id, Event.boot, Event.seq)
        after: tuple[float, str, int, int] | None = None
        async with self.db.session() as session:
            while True:
                query = (
                    select(
                        Event.received_at, Event.device_id, Event.boot, Event.seq, Event.name,
                        Event.body,
                    )
                    .where(Event.received_at > since, Event.name.like("ota.%"))
                    .order_by(Event.received_at, Event.device_id, Event.boot, Event.seq)
                    .limit(PAGE)
                )  # fmt: skip
                if after is not None:
                    query = query.where(key > after)
                rows = list(await session.execute(query))
                for received_at, device_id, boot, seq, name, body in rows:
                    rollout = body.get("rollout") if isinstance(body, dict) else None
                    if isinstance(rollout, str) and rollout in rollouts:
                        out[rollout].append(
                            ota_event(device_id, boot, seq, name, received_at, body)
                        )
                if len(rows) < PAGE:
                    return out
                last = rows[-1]
                after = (last[0], last[1], last[2], last[3])

    async def _step(self, rollout_id: str, events: list[OtaEvent], now: float) -> list[str]:
        """Apply the reports, decide, write: the devices newly told to install something."""
        async with self.db.session() as session:
            row = await session.get(Rollout, rollout_id)
            if row is None or row.status not in ACTIVE:
                return []
            devices = {
                d.device_id: d
                for d in await session.scalars(
                    select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
                )
            }
            target = Target(row.target, row.version)
            previous = (
                Target(row.previous_target, row.previous_version)
                if row.previous_target is not None and row.previous_version is not None
                else None
            )
            progress = {d: _progress(r) for d, r in devices.items()}
            for event in sorted(events, key=lambda e: (e.device_id, e.boot, e.seq)):
                if (current := progress.get(event.device_id)) is not None:
                    progress[event.device_id] = apply_event(current, event, target, previous)
            for device_id, p in progress.items():
                if p != _progress(devices[device_id]):
                    _store(devices[device_id], p)
            decision = decide(rollout_state(row), list(progress.values()), now)
            if decision.action == "rollback" and previous is None:  # cannot: pause instead
                decision = Decision("pause", decision.stage, decision.reasons)
            assigned = await self._act(session, row, devices, decision, now)
            if events:
                row.event_cursor = max(row.event_cursor, *(e.received_at for e in events))
            await session.commit()
        return assigned

    async def _act(
        self,
        session: AsyncSession,
        row: Rollout,
        devices: dict[str, RolloutDevice],
        decision: Decision,
        now: float,
    ) -> list[str]:
        reasons = list(decision.reasons)
        action = decision.action
        if action == "wait":
            # a paused or finished rollout waits without a reason of its own: keep why it stopped
            if reasons and row.reasons != reasons:
                row.reasons, row.updated_at = reasons, now
            return []
        if action == "await_approval" and row.status == "awaiting_approval":
            if row.reasons != reasons:
                row.reasons, row.updated_at = reasons, now
            return []
        row.reasons, row.updated_at = reasons, now
        stage_number = decision.stage + 1
        assigned: list[str] = []
        if action == "advance":
            for device_id in decision.devices:
                device = devices[device_id]
                device.state, device.assigned_at, device.updated_at = "assigned", now, now
            assigned = list(decision.devices)
            row.status, row.stage, row.stage_started_at = "running", decision.stage, now
            _history(row, "stage", now, stage=stage_number, devices=len(assigned))
            audit_system(
                session, "rollout.advance", row.id, stage=stage_number, devices=len(assigned)
            )
        elif action == "await_approval":
            row.status = "awaiting_approval"
            _history(row, "await_approval", now, stage=stage_number + 1)
            audit_system(session, "rollout.await_approval", row.id, stage=stage_number + 1)
        elif action == "pause":
            row.status = "paused"
            _history(row, "pause", now, stage=stage_number, reasons=reasons)
            audit_system(session, "rollout.pause", row.id, stage=stage_number, reasons=reasons)
        elif action == "rollback":
            for device_id in decision.devices:
                device = devices[device_id]
                device.state, device.assigned_at = "reverting", now
            assigned = list(decision.devices)
            row.status = "rolling_back"
            _history(row, "rollback", now, stage="rollback", devices=len(assigned), reasons=reasons)
            audit_system(
                session, "rollout.rollback", row.id, stage=stage_number, devices=len(assigned),
                reasons=reasons,
            )  # fmt: skip
        else:  # complete
            rolled_back = row.status == "rolling_back"
            row.status = "rolled_back" if rolled_back else "completed"
            row.finished_at = now
            await release(session, row.id)
            _history(row, row.status, now)
            audit_system(
                session, "rollout.rolled_back" if rolled_back else "rollout.complete", row.id
            )
        log.info("rollout %s: %s (%s)", row.id, action, "; ".join(reasons))
        return assigned
