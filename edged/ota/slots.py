"""The device's two model slots: a new bundle is written next to the one serving, tried, and
kept only once it has proved itself, so a power cut or a bad model never leaves the device
without a working model.

    <state_dir>/models/
        slots.json        which slot serves, which is known good, the trial, the last rollback
        a/bundle.edb      one bundle per slot
        a/slot.json       what the slot holds: {"version", "sha256", "generation"}
        b/bundle.edb, b/slot.json

State machine. Every arrow is one atomic write of slots.json (edged.atomic); bundle files are
only ever written into the slot that no state names, so a kill -9 at any instant leaves either
the state before an arrow or the state after it, and both name verified files:

    (no slots.json) ──adopt(factory)──► SERVING  active = known_good = a
    SERVING ──stage(bytes)──► SERVING            the other slot holds the bundle, checked on disk
    SERVING ──begin_trial──► TRIAL               active := staged slot, attempts = 1
    TRIAL ──count_start──► TRIAL                 a start: attempts + 1, written before loading
    TRIAL ──count_start past the cap──► SERVING  rolled back before the model is loaded
    TRIAL ──rollback(reason)──► SERVING          active := known_good; last_rollback = reason
    TRIAL ──commit──► SERVING                    known_good := active

In SERVING active == known_good and there is no trial; in TRIAL they differ and the trial names
the active slot. slots.json records the sha256 of both slots it names, checked before a file is
served. A slots.json that cannot be read, parsed or trusted is replaced (an `ota.slots_recovered`
note says why) by the older slot that verifies against its own slot.json — the older was the
known good one when the newer was staged — then the newer, then the factory bundle again;
never a crash loop. `fault_point` is the test hook that freezes the process at a named step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from edged.atomic import atomic_write
from edged.errors import EdgedError
from edged.logs import log_event
from edged_formats import FormatError, read_bundle

__all__ = [
    "FAULT_ENV",
    "SlotError",
    "Slots",
    "SlotsState",
    "Trial",
    "fault_point",
    "file_sha256",
]

log = logging.getLogger(__name__)
SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")
BUNDLE = "bundle.edb"
FORMAT = 1
FAULT_ENV = "EDGED_FAULT_PAUSE_AT"


class SlotError(EdgedError):
    """A slot operation refused: nothing was switched, the serving model is unchanged."""


def fault_point(step: str) -> None:
    """Test hook, off unless EDGED_FAULT_PAUSE_AT names `step`: log it, then SIGSTOP this
    process so a test can kill -9 it exactly here."""
    if os.environ.get(FAULT_ENV) == step:
        log_event(log, "warning", "fault_pause", step=step, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _other(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True, slots=True)
class Held:
    """What one slot holds."""

    version: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Trial:
    slot: SlotName
    version: str
    sha256: str
    attempts: int
    started_at: float
    baseline: dict[str, Any] = field(default_factory=dict)  # the previous model's live figures
    context: dict[str, str] = field(default_factory=dict)  # carried by every event (rollout)


@dataclass(frozen=True, slots=True)
class SlotsState:
    """The content of slots.json; transitions are pure and return a new state."""

    active: SlotName
    known_good: SlotName
    held: dict[SlotName, Held]  # exactly the slots named by active and known_good
    trial: Trial | None = None
    last_rollback: dict[str, Any] | None = None
    factory_sha256: str | None = None  # the configured bundle last adopted or installed

    def __post_init__(self) -> None:
        if (self.trial is None) != (self.active == self.known_good):
            raise ValueError("a trial is recorded exactly when active differs from known_good")
        if self.trial is not None and (self.trial.slot, self.trial.version) != (
            self.active,
            self.held[self.active].version,
        ):
            raise ValueError("the trial does not name the active slot")
        if set(self.held) != {self.active, self.known_good}:
            raise ValueError("slots.json must describe the active and known good slots")

    @property
    def inactive(self) -> SlotName:
        return _other(self.active)

    def with_trial(
        self,
        held: Held,
        at: float,
        baseline: dict[str, Any],
        factory: str | None,
        context: dict[str, str],
    ) -> SlotsState:
        slot = self.inactive
        trial = Trial(slot, held.version, held.sha256, 1, at, baseline, context)
        kept = {self.known_good: self.held[self.known_good], slot: held}
        factory = self.factory_sha256 if factory is None else factory
        return replace(self, active=slot, held=kept, trial=trial, factory_sha256=factory)

    def committed(self) -> SlotsState:
        return replace(
            self, known_good=self.active, held={self.active: self.held[self.active]}, trial=None
        )

    def rolled_back(self, reason: str, at: float) -> SlotsState:
        failed = self.held[self.active]
        record = {"slot": self.active, "version": failed.version, "reason": reason, "at": at}
        good = self.known_good
        return replace(
            self, active=good, held={good: self.held[good]}, trial=None, last_rollback=record
        )

    def started_again(self) -> SlotsState:
        assert self.trial is not None
        return replace(self, trial=replace(self.trial, attempts=self.trial.attempts + 1))

    def to_json(self) -> bytes:
        trial = self.trial
        doc = {
            "format": FORMAT,
            "active": self.active,
            "known_good": self.known_good,
            "slots": {k: {"version": v.version, "sha256": v.sha256} for k, v in self.held.items()},
            "trial": None
            if trial is None
            else {
                "slot": trial.slot,
                "version": trial.version,
                "sha256": trial.sha256,
                "attempts": trial.attempts,
                "started_at": trial.started_at,
                "baseline": trial.baseline,
                "context": trial.context,
            },
            "last_rollback": self.last_rollback,
            "factory_sha256": self.factory_sha256,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> SlotsState:
        """ValueError on anything but a well-formed, consistent document."""
        try:
            doc = json.loads(data)
            if doc["format"] != FORMAT:
                raise ValueError(f"format {doc['format']!r} is not {FORMAT}")
            held = {
                _slot(k): Held(_text(v["version"]), _digest(v["sha256"]))
                for k, v in doc["slots"].items()
            }
            t = doc["trial"]
            trial = None
            if t is not None:
                attempts, started = t["attempts"], t["started_at"]
                if not isinstance(attempts, int) or attempts < 0:
                    raise ValueError("trial attempts must be a count")
                if not isinstance(started, int | float) or not isinstance(t["baseline"], dict):
                    raise ValueError("trial started_at and baseline are malformed")
                context = t.get("context", {})
                if not isinstance(context, dict) or not all(
                    isinstance(v, str) for v in context.values()
                ):
                    raise ValueError("trial context is malformed")
                trial = Trial(
                    _slot(t["slot"]),
                    _text(t["version"]),
                    _digest(t["sha256"]),
                    attempts,
                    float(started),
                    t["baseline"],
                    context,
                )
                if held[trial.slot].sha256 != trial.sha256:
                    raise ValueError("the trial's sha256 disagrees with its slot's")
            rollback, factory = doc["last_rollback"], doc["factory_sha256"]
            if rollback is not None and not isinstance(rollback, dict):
                raise ValueError("last_rollback is malformed")
            return cls(
                _slot(doc["active"]),
                _slot(doc["known_good"]),
                held,
                trial,
                rollback,
                None if factory is None else _digest(factory),
            )
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed ({exc!r})") from exc


def _slot(value: object) -> SlotName:
    if value not in SLOTS:
        raise ValueError(f"{value!r} is not a slot")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a version")
    return value


def _digest(value: object) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError(f"{value!r} is not a sha256")
    return value


class Slots:
    """The two slots under `root` (`<state_dir>/models`). Not thread-safe: one owner (the
    daemon) calls it, from one task at a time."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.path = root / "slots.json"
        self._clock = clock
        self._state: SlotsState | None = None
        self.notes: list[tuple[str, dict[str, Any]]] = []  # events for the daemon to send

    @property
    def state(self) -> SlotsState:
        if self._state is None:
            raise SlotError("slots are not loaded: call adopt() first")
        return self._state

    def bundle_path(self, slot: SlotName) -> Path:
        return self.root / slot / BUNDLE

    def active_path(self) -> Path:
        return self.bundle_path(self.state.active)

    # -- start ------------------------------------------------------------------------------

    def adopt(self, factory: Path) -> bool:
        """Load slots.json, or on a first start copy `factory` (the configured bundle) into
        slot a as the known good model. True when it adopted. A slots.json that cannot be
        trusted is recovered from the slots themselves (see the module docstring)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._adopt(factory)
            return True
        except OSError as exc:
            self._recover(factory, f"slots.json cannot be read ({exc.strerror})")
            return False
        try:
            state = SlotsState.from_json(data)
        except ValueError as exc:
            self._recover(factory, f"slots.json is not valid: {exc}")
            return False
        self._state = state
        return False

    def _adopt(self, factory: Path, slot: SlotName = "a") -> None:
        try:
            data = factory.read_bytes()
        except OSError as exc:
            raise SlotError(
                f"no model slots yet and the model {factory} cannot be read ({exc.strerror})"
            ) from exc
        sha256 = hashlib.sha256(data).hexdigest()
        version = _version_of(data, factory)
        held = self._write_slot(slot, data, sha256, version, "adopt.written")
        self._commit_state(SlotsState(slot, slot, {slot: held}, factory_sha256=sha256))
        log_event(log, "info", "slots_adopted", model=str(factory), version=version)

    def fall_back(self, factory: Path, why: str) -> None:
        """The known good model cannot be served (its file rotted, or the runtime refuses it):
        serve the other slot if its file verifies, else adopt the configured bundle again —
        never a start that fails the same way every time."""
        self._recover(factory, why, exclude=self.state.active)

    def _recover(self, factory: Path, why: str, exclude: SlotName | None = None) -> None:
        log_event(log, "error", "slots_corrupt", reason=why)
        found = []
        for slot in SLOTS:
            if slot == exclude:
                continue
            got = self._verified_sidecar(slot)
            if got is not None:
                found.append((got[0], slot, got[1]))
        found.sort()  # the older slot was the known good one when the newer was staged
        if found:
            _, slot, held = found[0]
            try:
                factory_sha256: str | None = file_sha256(factory)
            except OSError:
                factory_sha256 = None
            self._commit_state(SlotsState(slot, slot, {slot: held}, None, None, factory_sha256))
            chosen = f"slot {slot} ({held.version})"
        else:
            self._adopt(factory, "b" if exclude == "a" else "a")
            chosen = f"the configured model {factory}"
        self.notes.append(("ota.slots_recovered", {"reason": why, "serving": chosen}))
        log_event(log, "warning", "slots_recovered", serving=chosen)

    def _verified_sidecar(self, slot: SlotName) -> tuple[int, Held] | None:
        try:
            meta = json.loads((self.root / slot / "slot.json").read_bytes())
            held = Held(_text(meta["version"]), _digest(meta["sha256"]))
            generation = int(meta["generation"])
            if file_sha256(self.bundle_path(slot)) != held.sha256:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return generation, held

    def count_start(self, max_attempts: int) -> str | None:
        """At every daemon start, before any model is loaded: a recorded trial gets one more
        attempt, written first; past `max_attempts` it is rolled back instead. Returns the
        rollback reason, or None."""
        trial = self.state.trial
        if trial is None:
            return None
        if trial.attempts + 1 > max_attempts:
            reason = (
                f"crash loop: {trial.version} was started {trial.attempts} times without "
                f"a verdict (max_start_attempts {max_attempts})"
            )
            self.rollback(reason)
            return reason
        self._commit_state(self.state.started_again())
        return None

    # -- verification -----------------------------------------------------------------------

    def verify(self, slot: SlotName) -> None:
        """SlotError unless the slot's file has the sha256 slots.json records for it."""
        held = self.state.held.get(slot)
        if held is None:
            raise SlotError(f"slot {slot} is not named by slots.json")
        try:
            actual = file_sha256(self.bundle_path(slot))
        except OSError as exc:
            raise SlotError(
                f"slot {slot} ({held.version}) cannot be read ({exc.strerror})"
            ) from exc
        if actual != held.sha256:
            raise SlotError(f"slot {slot} ({held.version}) does not match its sha256 on disk")

    # -- install ----------------------------------------------------------------------------

    def stage(self, data: bytes, sha256: str, version: str) -> Path:
        """Write an already verified bundle into the inactive slot (atomic, fsynced), read it
        back and check its sha256 again. Changes no state: the serving model is untouched."""
        if self.state.trial is not None:
            raise SlotError(f"a trial of {self.state.trial.version} is in progress")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SlotError("the bundle does not match its sha256")
        slot = self.state.inactive
        self._write_slot(slot, data, sha256, version, "stage.written")
        return self.bundle_path(slot)

    def _write_slot(
        self, slot: SlotName, data: bytes, sha256: str, version: str, step: str
    ) -> Held:
        directory = self.root / slot
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (directory / "slot.json").unlink()  # the file about to change is no longer this
        atomic_write(self.bundle_path(slot), data)
        fault_point(step)
        if file_sha256(self.bundle_path(slot)) != sha256:
            raise SlotError(
                f"artifact modified on disk between verification and install (slot {slot})"
            )
        generations = [self._generation(s) for s in SLOTS]
        generation = 1 + max((g for g in generations if g is not None), default=0)
        meta = {"version": version, "sha256": sha256, "generation": generation}
        atomic_write(directory / "slot.json", json.dumps(meta).encode())
        return Held(version, sha256)

    def _generation(self, slot: SlotName) -> int | None:
        try:
            return int(json.loads((self.root / slot / "slot.json").read_bytes())["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def begin_trial(
        self,
        baseline: dict[str, Any] | None = None,
        factory_sha256: str | None = None,
        context: dict[str, str] | None = None,
    ) -> Trial:
        """Switch to the staged slot: check its file against what stage() recorded, then
        record the trial (with the previous model's `baseline` figures and the `context`
        fields its events carry) and the new active slot in one write."""
        state = self.state
        if state.trial is not None:
            raise SlotError(f"a trial of {state.trial.version} is in progress")
        slot = state.inactive
        got = self._verified_sidecar(slot)
        if got is None:
            raise SlotError(f"the bundle staged in slot {slot} does not verify; not switching")
        new = state.with_trial(got[1], self._clock(), baseline or {}, factory_sha256, context or {})
        self._commit_state(new)
        assert new.trial is not None
        return new.trial

    def commit(self) -> None:
        """The trial passed: the active slot becomes the known good one."""
        if self.state.trial is None:
            raise SlotError("no trial to commit")
        self._commit_state(self.state.committed())

    def rollback(self, reason: str) -> None:
        """Back to the known good slot; `reason` is kept as last_rollback."""
        if self.state.trial is None:
            raise SlotError(f"nothing to roll back to ({reason})")
        self._commit_state(self.state.rolled_back(reason, self._clock()))
        log_event(log, "warning", "slots_rolled_back", reason=reason)

    def _commit_state(self, state: SlotsState) -> None:
        atomic_write(self.path, state.to_json())
        self._state = state

    def status(self) -> dict[str, Any]:
        """For `edged status` and telemetry."""
        s = self.state
        trial = s.trial
        return {
            "active": {"slot": s.active, "version": s.held[s.active].version},
            "known_good": {"slot": s.known_good, "version": s.held[s.known_good].version},
            "trial": None
            if trial is None
            else {
                "version": trial.version,
                "attempts": trial.attempts,
                "started_at": trial.started_at,
            },
            "last_rollback": s.last_rollback,
        }


def _version_of(data: bytes, path: Path) -> str:
    try:
        return read_bundle(data).manifest.version
    except FormatError as exc:
        raise SlotError(f"{path}: {exc}") from exc
