"""The updater task in the daemon: when told (MQTT `cmd/update`) or on a slow timer, ask the
control plane what to run, and if it differs from what runs, walk the trust chain, fetch the
artifact (patch or full) and hand the verified file to the installer (A/B slots and the health
trial). Every step is reported as an `ota.*` event through the outbox (docs/ota.md).

The assignment only says *which* target; whether it may be installed is the trust walk's and
the target's hardware/channel decision. Blocking work (HTTP, hashing, patching) runs on a
worker thread, so inference never waits on it. A target that failed its health trial here is
never retried; a refusal (of the trust walk or of the install) or a transport error is retried
at the next poll, and reported again only when its reason changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from edged.atomic import atomic_write
from edged.config import Config
from edged.enrollment import Enrollment
from edged.errors import EdgedError
from edged.ota.client import Fetched, UpdateClient, UpdatePolicy
from edged.ota.fetcher import FetchError, HttpFetcher
from edged_formats.errors import FormatError

__all__ = ["Assignment", "HttpControl", "Installer", "Updater", "updater_for"]

log = logging.getLogger("edged.ota")
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
_KEEP = 64  # remembered outcomes


@dataclass(frozen=True, slots=True)
class Assignment:
    rollout: str
    target: str
    version: str


class SlotInstaller(Protocol):
    def active_sha256(self) -> str: ...

    def active_path(self) -> Path: ...

    def trial_running(self) -> bool: ...


class InstallResult(Protocol):
    @property
    def result(self) -> str: ...

    @property
    def reason(self) -> str: ...


InstallFn = Callable[..., Awaitable[InstallResult]]


class Control(Protocol):
    def assignment(self) -> Assignment | None: ...


class Installer(Protocol):
    """Installs a verified bundle through the slots and the health trial (Daemon.install):
    returns "committed", "rolled_back" (switched to, failed its trial) or "refused" (never
    switched to), and a reason."""

    def active_sha256(self) -> str | None: ...

    def active_path(self) -> Path | None: ...

    def trial_running(self) -> bool: ...

    async def install(
        self, path: Path, sha256: str, version: str, context: Mapping[str, Any]
    ) -> tuple[str, str]: ...


class HttpControl:
    """`GET /v1/device/self/update` with the device's API token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def assignment(self) -> Assignment | None:
        try:
            response = self.client.get("/v1/device/self/update")
        except httpx.HTTPError as exc:
            raise FetchError(f"cannot ask the control plane for an update: {exc}") from exc
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise FetchError(f"the control plane answered HTTP {response.status_code}")
        try:
            body = response.json()
            return Assignment(str(body["rollout"]), str(body["target"]), str(body["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(
                "the control plane's update answer is not {rollout, target, version}"
            ) from exc


class Updater:
    def __init__(
        self,
        client: UpdateClient,
        control: Control,
        installer: Installer,
        emit: Emit,
        state_file: Path,
        *,
        poll_s: float = 3600.0,
    ) -> None:
        self.client, self.control, self.installer, self.emit = client, control, installer, emit
        self.poll_s = poll_s
        self.state_file = state_file
        self._wake = asyncio.Event()
        self._state: dict[str, Any] = self._load()
        self.last_outcome: str | None = None
        self.last_reason: str | None = None  # why the last refusal or rollback happened
        self.checks = 0

    def _load(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
            if isinstance(state, dict):
                return state
        return {}

    def _remember(self, key: str, value: str) -> None:
        seen: dict[str, str] = self._state.setdefault(key, {})
        seen[value] = value
        while len(seen) > _KEEP:
            seen.pop(next(iter(seen)))
        atomic_write(self.state_file, json.dumps(self._state).encode())

    def notify(self, _command: str = "update", _payload: bytes = b"") -> None:
        """A hint from the control plane: check now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # never let one bad update stop the task
                log.exception("update check failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on a daemon thread (one at a time: check() awaits each), so a stop never
        waits for a download; what it left half done is resumed by the next start."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(error: BaseException | None, value: Any) -> None:
            if not future.done():
                future.set_exception(error) if error else future.set_result(value)

        def work() -> None:
            try:
                value, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting task
                value, error = None, exc
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, error, value)

        threading.Thread(target=work, name="edged-ota", daemon=True).start()
        return await future

    async def _report(self, name: str, assignment: Assignment, **fields: Any) -> None:
        body = {"rollout": assignment.rollout, "target": assignment.target}
        await self.emit(name, body | {"version": assignment.version} | fields)

    async def check(self) -> str:
        """One round: 'none', 'unreachable', 'busy', 'current', 'skipped', 'refused',
        'committed' or 'rolled_back'."""
        self.last_reason = None
        try:
            assignment = await self._blocking(self.control.assignment)
        except FetchError as exc:
            log.warning("update: %s", exc)
            self.last_reason = str(exc)
            return self._outcome("unreachable")
        if assignment is None:
            await self._blocking(self.client.prune, set())  # left by an interrupted install
            return self._outcome("none")
        try:
            trusted = await self._blocking(self.client.refresh)
            target = trusted.target(
                assignment.target, self.client.policy.hardware, self.client.policy.channel
            )
        except (FormatError, EdgedError) as exc:
            return await self._refused(assignment, exc)
        if self.installer.trial_running():
            return self._outcome("busy")  # the trial reports its own verdict
        if target.sha256 == self.installer.active_sha256():
            if assignment.rollout not in self._state.get("reported", {}):
                await self._report("ota.committed", assignment, already=True)
                self._remember("reported", assignment.rollout)
            await self._blocking(self.client.prune, set())  # left by an interrupted install
            return self._outcome("current")
        if target.sha256 in self._state.get("failed", {}):
            return self._outcome("skipped")  # it failed its health check here before
        await self._report("ota.started", assignment, bytes=target.length)
        try:
            fetched: Fetched = await self._blocking(
                self.client.fetch_target, target, self.installer.active_path()
            )
        except (FormatError, EdgedError, OSError) as exc:
            return await self._refused(assignment, exc)
        await self._report(
            "ota.downloaded",
            assignment,
            via=fetched.via,
            bytes=fetched.fetched_bytes,
            fallback=fetched.fallback,
        )
        context = {"rollout": assignment.rollout, "target": assignment.target}
        result, reason = await self.installer.install(
            fetched.path, target.sha256, assignment.version, context
        )
        self.last_reason = reason
        if result == "refused":  # the installer reported it; try again at the next poll
            return self._outcome("refused")
        await self._blocking(self.client.prune, set())
        self._remember("reported", assignment.rollout)
        if result != "committed":
            self._remember("failed", target.sha256)
            log.warning("update %s rolled back: %s", assignment.version, reason)
            return self._outcome("rolled_back")
        return self._outcome("committed")

    async def _refused(self, assignment: Assignment, error: Exception) -> str:
        reason = self.last_reason = str(error)
        log.warning("update %s refused: %s", assignment.target, reason)
        key = f"{assignment.rollout}:{assignment.target}:{reason}"
        if key not in self._state.get("refusals", {}):
            await self._report("ota.refused", assignment, reason=reason, kind=type(error).__name__)
            self._remember("refusals", key)
        return self._outcome("refused")

    def _outcome(self, outcome: str) -> str:
        self.last_outcome = outcome
        self.checks += 1  # completed checks: the outcome and reason are final
        return outcome

    def status(self) -> dict[str, Any]:
        return {"checks": self.checks, "last_check": self.last_outcome, "reason": self.last_reason}


BaseOf = Callable[[], tuple[str, Path] | None]


class _DaemonInstaller:
    """The daemon's slots and Daemon.install as the updater's Installer. A personalised model
    (docs/finetune.md) stands for its base: `base_of` gives the base's digest and file, so an
    assignment of that base is current and a delta patches against it."""

    def __init__(self, slots: SlotInstaller, install: InstallFn, base_of: BaseOf | None) -> None:
        self.slots, self._install, self._base_of = slots, install, base_of

    def _base(self) -> tuple[str, Path] | None:
        return None if self._base_of is None else self._base_of()

    def active_sha256(self) -> str | None:
        base = self._base()
        return self.slots.active_sha256() if base is None else base[0]

    def active_path(self) -> Path | None:
        base = self._base()
        return self.slots.active_path() if base is None or not base[1].exists() else base[1]

    def trial_running(self) -> bool:
        return self.slots.trial_running()

    async def install(
        self, path: Path, sha256: str, version: str, context: Mapping[str, Any]
    ) -> tuple[str, str]:
        outcome = await self._install(path, sha256, version, context=context)
        return outcome.result, outcome.reason


def updater_for(
    config: Config,
    enrollment: Enrollment,
    slots: SlotInstaller,
    install: InstallFn,
    event: Callable[..., Awaitable[None]],
    *,
    base_of: BaseOf | None = None,
) -> Updater:
    """The daemon's updater: the enrolled control plane's repository and assignment routes."""
    state_dir, update = config.device.state_dir, config.update
    token = enrollment.api_token(state_dir)
    policy = UpdatePolicy(
        hardware=update.hardware,
        channel=update.channel,
        reserve_bytes=config.outbox.min_free_mb << 20,
    )
    base = enrollment.url.rstrip("/")
    fetcher = HttpFetcher(
        f"{base}/v1/repository", token, timeout_s=update.timeout_s, bytes_per_s=update.bytes_per_s
    )
    ota = state_dir / "ota"
    return Updater(
        UpdateClient(fetcher, ota, policy),
        HttpControl(base, token, timeout_s=update.timeout_s),
        _DaemonInstaller(slots, install, base_of),
        lambda name, body: event(name, **body),
        ota / "updater.json",
        poll_s=update.poll_s,
    )
