"""Installing a verified bundle on a serving device: the slots (edged.ota.slots), the engine's
hot swap and the health trial (edged.ota.trial) put together. `Daemon.install` is its front.

    load_serving()   at start, before anything serves: adopt, count_start, verify and load the
                     active slot, or roll back and load the known good one, or fall back to
                     the other slot or the configured bundle
    Installer.install(bytes, sha256, version)
        checks ─► stage ─► begin_trial ─► engine.swap ─► canaries ─► watch ─► commit
          └──────────┴── refused: ota.refused         failed anywhere ─► rollback + swap back
    Installer.resume_trial()   a start that found a trial: run its trial again
    Installer.observe(result)  a pipeline sink: the watch's input, and the next baseline

Every step is an event through `emit` (the daemon's outbox) and, for tests, a `fault_point`.
Each event body carries the install's `context` fields (the updater's `rollout` and `target`,
kept in the trial record so a restart's verdict carries them too), `version`, and on a verdict
the trial's figures at the top level (`canary_agreement`, `confidence_before`,
`confidence_after`, `latency_ratio`, `error_rate`, ...), as docs/ota.md's rollouts read them.
A stop or crash in between leaves slots.json at the last completed step (see slots.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edged.config import UpdateConfig
from edged.engine import Engine, open_bundle
from edged.errors import EdgedError, ModelError
from edged.logs import log_event
from edged.ota.slots import SlotError, Slots, fault_point, file_sha256
from edged.ota.trial import (
    Baseline,
    InstallOutcome,
    Traffic,
    TrialPolicy,
    Verdict,
    Watch,
    canary_verdict,
)
from edged.pipeline import Result
from edged_formats import Bundle, FormatError, read_bundle

__all__ = ["Installer", "load_serving"]

log = logging.getLogger("edged.ota")
Note = tuple[str, dict[str, Any]]
Emit = Callable[..., Awaitable[None]]  # emit(name, **detail): a durable event


def load_serving(
    slots: Slots, factory: Path, max_start_attempts: int, load: Callable[[Path], Engine]
) -> tuple[Engine, list[Note]]:
    """Blocking, before anything serves. The slots' state (adopting `factory` on a first
    start), one more start of a recorded trial (or its rollback past the cap), then the
    active slot's model, verified and loaded; if it does not verify or load, roll back and
    load the known good one; if that fails too, the other slot (if it verifies) or the
    configured bundle adopted again; only when even that fails, ModelError says why. Also
    returns the events to send once the outbox is open."""
    notes: list[Note] = []
    slots.adopt(factory)
    trial = slots.state.trial
    reason = slots.count_start(max_start_attempts)
    if trial is not None and reason is not None:
        notes.append(_rolled_back(slots, trial.context, trial.version, reason))
    elif trial is not None:
        detail = {"version": trial.version, "attempts": trial.attempts + 1}
        notes.append(("ota.trial_resumed", {**trial.context, **detail}))
    try:
        return _load_active(slots, load), [*slots.notes, *notes]
    except (SlotError, ModelError) as exc:
        failed: Exception = exc
    trial = slots.state.trial
    if trial is not None:
        reason = f"does not load: {failed}"
        slots.rollback(reason)
        notes.append(_rolled_back(slots, trial.context, trial.version, reason))
        try:
            return _load_active(slots, load), [*slots.notes, *notes]
        except (SlotError, ModelError) as exc:
            failed = exc
    slots.fall_back(factory, f"the known good model cannot be served: {failed}")
    try:
        return _load_active(slots, load), [*slots.notes, *notes]
    except (SlotError, ModelError) as exc:
        raise ModelError(
            f"no model can be served: the known good one failed ({failed}), and so did the"
            f" fallback ({exc})"
        ) from exc


def _load_active(slots: Slots, load: Callable[[Path], Engine]) -> Engine:
    slots.verify(slots.state.active)
    return load(slots.active_path())


def _rolled_back(slots: Slots, context: dict[str, str], version: str, reason: str) -> Note:
    restored = slots.status()["active"]["version"]
    return "ota.rolled_back", {
        **context,
        "version": version,
        "reason": reason,
        "restored": restored,
    }


class Installer:
    """Owns the installs and trials of one serving engine; one at a time."""

    def __init__(
        self,
        slots: Slots,
        engine: Engine,
        *,
        update: Callable[[], UpdateConfig],
        model_swapped: Callable[[], None],
        inference_errors: Callable[[], int],
        emit: Emit,
        restore_failed: Callable[[str], None],
    ) -> None:
        self.slots, self.engine = slots, engine
        self._update, self._model_swapped = update, model_swapped
        self._inference_errors, self._emit = inference_errors, emit
        self._restore_failed = restore_failed
        self.traffic = Traffic()  # the serving model's recent results: a trial's baseline
        self._watch: tuple[str, Watch] | None = None  # (version under trial, its watch)
        self._busy = asyncio.Lock()

    async def install(
        self,
        bundle: bytes | Path,
        sha256: str,
        version: str,
        *,
        context: dict[str, str] | None = None,
        factory_sha256: str | None = None,
        judge_confidence: bool = True,
    ) -> InstallOutcome:
        """See Daemon.install; `factory_sha256` is recorded with the switch when the bundle
        came from `device.model`."""
        context = dict(context or {})
        if self._busy.locked():
            return await self.refuse(version, "another install or trial is in progress", context)
        async with self._busy:
            try:
                data = (
                    bundle
                    if isinstance(bundle, bytes)
                    else await asyncio.to_thread(bundle.read_bytes)
                )
                new = await asyncio.to_thread(self._check, data, sha256, version)
                path = await asyncio.to_thread(self.slots.stage, data, sha256, version)
            except (EdgedError, OSError) as exc:
                return await self.refuse(version, _why(exc), context)
            del data
            slot = self.slots.state.inactive
            await self._event("ota.staged", context, version=version, slot=slot, sha256=sha256)
            fault_point("staged")
            previous = self.engine.manifest.version
            baseline = self.traffic.baseline()
            if not judge_confidence:  # recorded so, a resumed trial judges the same way
                baseline = dataclasses.replace(baseline, mean_confidence=None)
            try:
                await asyncio.to_thread(
                    self.slots.begin_trial, baseline.to_dict(), factory_sha256, context
                )
            except (EdgedError, OSError) as exc:
                return await self.refuse(version, _why(exc), context)
            await self._event(
                "ota.switched", context, version=version, slot=slot, previous=previous
            )
            fault_point("switched")
            try:
                await asyncio.to_thread(self.engine.swap, new)
            except EdgedError as exc:  # the engine still serves the known good model
                verdict = Verdict("rollback", f"does not load: {exc}")
                return await self._conclude(verdict, version, context, swapped=False)
            del new
            self._model_swapped()
            log_event(
                log, "info", "model_swapped", previous=previous, version=version, path=str(path)
            )
            fault_point("swapped")
            verdict = await self._trial(version, baseline)
            return await self._conclude(verdict, version, context)

    def _check(self, data: bytes, sha256: str, version: str) -> Bundle:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SlotError("the bundle does not match its sha256")
        try:
            new = read_bundle(data)
        except FormatError as exc:
            raise ModelError(f"not a servable bundle: {exc}") from exc
        manifest, serving = new.manifest, self.engine.manifest
        if manifest.version != version:
            raise ModelError(f"the bundle is version {manifest.version}, not {version}")
        takes = (manifest.input.dtype, list(manifest.input.shape[1:]))
        fed = (serving.input.dtype, list(serving.input.shape[1:]))
        if takes != fed:
            raise ModelError(
                f"the bundle takes {takes[0]} samples of shape {takes[1]}; the sources "
                f"deliver {fed[0]} {fed[1]} (a restart is needed for that)"
            )
        return new

    async def refuse(
        self, version: str, reason: str, context: dict[str, str] | None = None
    ) -> InstallOutcome:
        """Nothing was switched: `ota.refused` with the reason."""
        await self._event("ota.refused", context or {}, version=version, reason=reason)
        return InstallOutcome("refused", version, reason)

    async def _event(self, name: str, context: dict[str, str], **detail: Any) -> None:
        await self._emit(name, **{**context, **detail})

    async def _trial(self, version: str, baseline: Baseline) -> Verdict:
        """Canaries, then the watch of live traffic, until a verdict."""
        policy = TrialPolicy.from_config(self._update())
        try:
            agreement = await asyncio.to_thread(self.engine.canary_agreement)
        except Exception as exc:  # a runtime that fails on the canaries fails the trial
            return Verdict("rollback", f"canaries could not run: {exc!r}")
        canaries = canary_verdict(agreement, policy)
        if canaries.action == "rollback":
            return canaries
        watch = Watch(policy, baseline, time.monotonic())
        self._watch = (version, watch)
        errors = self._inference_errors()
        try:
            while True:
                now_errors = self._inference_errors()
                watch.error(now_errors - errors)
                errors = now_errors
                verdict = watch.verdict(time.monotonic())
                if verdict.action != "watch":
                    return Verdict(
                        verdict.action, verdict.reason, canaries.figures | verdict.figures
                    )
                left = watch.started + policy.watch_s - time.monotonic()
                await asyncio.sleep(max(0.01, min(1.0, left)))
        finally:
            self._watch = None

    async def _conclude(
        self, verdict: Verdict, version: str, context: dict[str, str], *, swapped: bool = True
    ) -> InstallOutcome:
        self.traffic.clear()  # the next baseline is whatever serves from now on
        if verdict.action == "commit":
            await asyncio.to_thread(self.slots.commit)
            fault_point("committed")
            await self._event(
                "ota.committed", context, **verdict.figures, version=version, reason=verdict.reason
            )
            return InstallOutcome("committed", version, verdict.reason, verdict.figures)
        await asyncio.to_thread(self.slots.rollback, verdict.reason)
        fault_point("rolled_back")
        restored = self.slots.status()["active"]["version"]
        if swapped:
            try:
                await asyncio.to_thread(self._swap_to_active)
            except (EdgedError, OSError) as exc:  # the known good model does not load now
                log_event(log, "error", "restore_failed", version=restored, reason=_why(exc))
                self._restore_failed(_why(exc))
        await self._event(
            "ota.rolled_back",
            context,
            **verdict.figures,
            version=version,
            reason=verdict.reason,
            restored=restored,
        )
        return InstallOutcome("rolled_back", version, verdict.reason, verdict.figures)

    def _swap_to_active(self) -> None:
        self.slots.verify(self.slots.state.active)
        self.engine.swap(open_bundle(self.slots.active_path()))
        self._model_swapped()

    async def resume_trial(self) -> None:
        """A start with a trial recorded serves the trial model: its trial runs again,
        against the baseline recorded at the switch."""
        trial = self.slots.state.trial
        if trial is None:
            return
        async with self._busy:
            verdict = await self._trial(trial.version, Baseline.from_dict(trial.baseline))
            await self._conclude(verdict, trial.version, trial.context)

    async def install_configured(self, path: Path) -> InstallOutcome | None:
        """`device.model` names a bundle other than the one adopted or installed from it
        last (or serving): install it like any update; its trial decides whether it stays."""
        try:
            sha256 = await asyncio.to_thread(file_sha256, path)
        except OSError as exc:
            log_event(
                log, "warning", "configured_model_unreadable", path=str(path), reason=_why(exc)
            )
            return None
        state = self.slots.state
        if sha256 in (state.factory_sha256, state.held[state.active].sha256):
            return None
        try:
            data, version = await asyncio.to_thread(_read_with_version, path)
        except (OSError, FormatError) as exc:
            log_event(log, "error", "model_refused", path=str(path), reason=_why(exc))
            return None
        log_event(log, "info", "configured_model_changed", path=str(path), version=version)
        digest = hashlib.sha256(data).hexdigest()  # of what is installed, if the file changed
        outcome = await self.install(data, digest, version, factory_sha256=digest)
        log_event(
            log,
            "info",
            f"configured_model_{outcome.result}",
            version=version,
            reason=outcome.reason,
        )
        return outcome

    def observe(self, result: Result) -> None:
        """A pipeline sink: each result feeds the running trial's watch, or the baseline."""
        watching = self._watch
        if watching is None:
            self.traffic.add(result.confidence, result.latency_ms)
        elif result.model == watching[0]:
            watching[1].result(result.confidence, result.latency_ms)

    def active_sha256(self) -> str:
        """The serving slot's bundle digest: what an assignment is compared with."""
        state = self.slots.state
        return state.held[state.active].sha256

    def active_path(self) -> Path:
        """The serving slot's bundle: the parent a delta patch applies to."""
        return self.slots.active_path()

    def trial_running(self) -> bool:
        """A switched-to model is still on trial (its verdict is not in yet)."""
        return self.slots.state.trial is not None

    def status(self) -> dict[str, Any]:
        """The slots, and the watch's figures while one runs."""
        status = self.slots.status()
        watching = self._watch
        status["watch"] = None if watching is None else watching[1].figures(time.monotonic())
        return status


def _read_with_version(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, read_bundle(data).manifest.version


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or 'disk'}: {exc.strerror}"
    return str(exc) or type(exc).__name__
