"""The updater task in the daemon: when told (MQTT `cmd/update`) or on a slow timer, ask the
control plane what to run, and if it differs from what runs, walk the trust chain, fetch the
artifact (patch or full) and hand the verified file to the installer (A/B slots and the health
trial). Every step is reported as an `ota.*` event through the outbox (docs/ota.md).

The assignment only says *which* target; whether it may be installed is the trust walk's and
the target's hardware/channel decision. Blocking work (HTTP, hashing, patching) runs on one
worker thread, so inference never waits on it. A target that failed its health trial here is
never retried; a refusal or a transport error is retried on the next poll and reported again
only when its reason changes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from edged.atomic import atomic_write
from edged.errors import EdgedError
from edged.ota.client import Fetched, UpdateClient
from edged.ota.fetcher import FetchError
from edged_formats.errors import FormatError

__all__ = ["Assignment", "HttpControl", "Installer", "Updater"]

log = logging.getLogger("edged.ota")
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]
_KEEP = 64  # remembered outcomes


@dataclass(frozen=True, slots=True)
class Assignment:
    rollout: str
    target: str
    version: str


class Control(Protocol):
    def assignment(self) -> Assignment | None: ...


class Installer(Protocol):
    """Installs a verified bundle through the slots and the health trial; True if committed."""

    def active_sha256(self) -> str | None: ...

    def active_path(self) -> Path | None: ...

    async def install(
        self, path: Path, sha256: str, version: str, context: Mapping[str, Any]
    ) -> tuple[bool, str | None]: ...


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
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edged-ota")
        self._state: dict[str, Any] = self._load()
        self.last_outcome: str | None = self._state.get("last")

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
        try:
            while True:
                try:
                    await self.check()
                except Exception:  # never let one bad update stop the task
                    log.exception("update check failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
        finally:
            self._worker.shutdown(wait=False, cancel_futures=True)

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _report(self, name: str, assignment: Assignment, **fields: Any) -> None:
        body = {"rollout": assignment.rollout, "target": assignment.target}
        await self.emit(name, body | {"version": assignment.version} | fields)

    async def check(self) -> str:
        """One round: 'none', 'current', 'skipped', 'refused', 'committed' or 'rolled_back'."""
        try:
            assignment = await self._blocking(self.control.assignment)
        except FetchError as exc:
            log.warning("update: %s", exc)
            return self._outcome("unreachable")
        if assignment is None:
            return self._outcome("none")
        try:
            trusted = await self._blocking(self.client.refresh)
            target = trusted.target(
                assignment.target, self.client.policy.hardware, self.client.policy.channel
            )
        except (FormatError, EdgedError) as exc:
            return await self._refused(assignment, exc)
        if target.sha256 == self.installer.active_sha256():
            if assignment.rollout not in self._state.get("reported", {}):
                await self._report("ota.committed", assignment, already=True)
                self._remember("reported", assignment.rollout)
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
        committed, reason = await self.installer.install(
            fetched.path, target.sha256, assignment.version, context
        )
        await self._blocking(self.client.prune, set())
        self._remember("reported", assignment.rollout)
        if not committed:
            self._remember("failed", target.sha256)
            log.warning("update %s rolled back: %s", assignment.version, reason)
            return self._outcome("rolled_back")
        return self._outcome("committed")

    async def _refused(self, assignment: Assignment, error: Exception) -> str:
        reason = str(error)
        log.warning("update %s refused: %s", assignment.target, reason)
        key = f"{assignment.rollout}:{assignment.target}:{reason}"
        if key not in self._state.get("refusals", {}):
            await self._report("ota.refused", assignment, reason=reason, kind=type(error).__name__)
            self._remember("refusals", key)
        return self._outcome("refused")

    def _outcome(self, outcome: str) -> str:
        self.last_outcome = outcome
        return outcome
