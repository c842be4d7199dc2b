"""The updater's decisions over a repository simulator: what it reports, when it installs, and
what it never retries."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edged.ota.client import UpdateClient, UpdatePolicy
from edged.ota.fetcher import FetchError
from edged.ota.updater import Assignment, Updater
from edged_formats.tuf import artifact_path
from tests.support.tuf_simulator import RepositorySimulator

OLD, NEW = b"old model" * 300, b"new model" * 300
NAME = "models/digits/1.2.0.edb"


class Control:
    """What the control plane assigns; None is 204, an exception is unreachable."""

    def __init__(self) -> None:
        self.answer: Assignment | Exception | None = Assignment("r1", NAME, "1.2.0")

    def assignment(self) -> Assignment | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Installer:
    """Slots reduced to one file and a verdict the test chooses."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "active.edb"
        self.path.write_bytes(OLD)
        self.verdict = ("committed", "healthy")
        self.installs: list[tuple[bytes, str]] = []
        self.trial = False

    def active_sha256(self) -> str | None:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def active_path(self) -> Path | None:
        return self.path

    def trial_running(self) -> bool:
        return self.trial

    async def install(
        self, path: Path, sha256: str, version: str, context: Mapping[str, Any]
    ) -> tuple[str, str]:
        self.installs.append((path.read_bytes(), version))
        if self.verdict[0] == "committed":
            self.path.write_bytes(path.read_bytes())
        return self.verdict


@pytest.fixture
def parts(tmp_path: Path) -> tuple[RepositorySimulator, Control, Installer, Updater, list]:
    sim = RepositorySimulator()
    sim.add_target(NAME, NEW, model="digits", version="1.2.0")
    events: list[tuple[str, dict[str, Any]]] = []

    async def emit(name: str, body: dict[str, Any]) -> None:
        events.append((name, body))

    client = UpdateClient(
        sim, tmp_path / "ota", UpdatePolicy(reserve_bytes=0), clock=lambda: sim.now
    )
    client.metadata.write("root", sim.first_root)
    control, installer = Control(), Installer(tmp_path)
    updater = Updater(client, control, installer, emit, tmp_path / "ota" / "updater.json")
    return sim, control, installer, updater, events


async def test_assigned_target_is_fetched_installed_and_reported(parts) -> None:
    """started, downloaded, then the installer; a second check finds nothing to do."""
    _sim, _control, installer, updater, events = parts
    assert await updater.check() == "committed"
    assert installer.installs == [(NEW, "1.2.0")]
    assert [name for name, _ in events] == ["ota.started", "ota.downloaded"]
    assert events[0][1] == {"rollout": "r1", "target": NAME, "version": "1.2.0", "bytes": len(NEW)}
    assert await updater.check() == "current"
    assert len(events) == 2  # already reported for this rollout


async def test_nothing_assigned_or_unreachable_does_nothing(parts) -> None:
    """204 and a control plane that cannot be reached are quiet no-ops."""
    _sim, control, installer, updater, events = parts
    control.answer = None
    assert await updater.check() == "none"
    control.answer = FetchError("down")
    assert await updater.check() == "unreachable"
    assert installer.installs == [] and events == []


async def test_refusal_is_reported_once_per_reason(parts) -> None:
    """A tampered artifact is refused, reported once, and never reaches the installer."""
    sim, _control, installer, updater, events = parts
    sim.overrides[artifact_path(sim.targets[NAME])] = b"X" * len(NEW)
    assert await updater.check() == "refused"
    assert await updater.check() == "refused"
    refusals = [body for name, body in events if name == "ota.refused"]
    assert len(refusals) == 1 and "sha256" in refusals[0]["reason"]
    assert installer.installs == []


async def test_assignment_the_device_may_not_install_is_refused(parts) -> None:
    """A target for other hardware (or not signed at all) is refused, not installed."""
    sim, control, installer, updater, events = parts
    sim.add_target("models/cam/1.edb", b"cam", hardware=["jetson"])
    control.answer = Assignment("r2", "models/cam/1.edb", "1")
    assert await updater.check() == "refused"
    control.answer = Assignment("r3", "models/never-signed.edb", "1")
    assert await updater.check() == "refused"
    reasons = [body["reason"] for name, body in events if name == "ota.refused"]
    assert "hardware ['jetson']" in reasons[0] and "not in targets" in reasons[1]
    assert installer.installs == []


async def test_target_that_failed_its_health_check_is_not_retried(parts) -> None:
    """After a rollback the same artifact is skipped, even across an updater restart."""
    _sim, control, installer, updater, _events = parts
    installer.verdict = ("rolled_back", "canaries 0.2 < 1.0")
    assert await updater.check() == "rolled_back"
    assert await updater.check() == "skipped"
    again = Updater(updater.client, control, installer, updater.emit, updater.state_file)
    assert await again.check() == "skipped"
    assert len(installer.installs) == 1


async def test_refused_install_is_tried_again(parts) -> None:
    """An install the daemon refused (busy with a trial) is not marked failed."""
    _sim, _control, installer, updater, _events = parts
    installer.verdict = ("refused", "another install or trial is in progress")
    assert await updater.check() == "refused"
    installer.verdict = ("committed", "healthy")
    assert await updater.check() == "committed"
    assert len(installer.installs) == 2


async def test_nothing_happens_while_a_trial_runs(parts) -> None:
    """A trial in progress (resumed after a restart) is left to report its own verdict."""
    _sim, _control, installer, updater, events = parts
    installer.trial = True
    assert await updater.check() == "busy"
    assert installer.installs == [] and events == []


async def test_a_personalised_model_stands_for_its_base(parts, tmp_path: Path) -> None:
    """docs/finetune.md: serving a personalised model whose base is the assigned target is
    current; any other target installs over it."""
    from edged.ota.updater import _DaemonInstaller

    sim, control, installer, _updater, events = parts
    installer.path.write_bytes(b"personalised" * 300)
    base_file = tmp_path / "base.edb"
    base_file.write_bytes(NEW)
    base = (hashlib.sha256(NEW).hexdigest(), base_file)
    installed: list[str] = []

    async def install(path: Path, sha256: str, version: str, *, context: Any) -> Any:
        installed.append(version)
        return type("Outcome", (), {"result": "committed", "reason": "healthy"})()

    client = UpdateClient(
        sim, tmp_path / "ota2", UpdatePolicy(reserve_bytes=0), clock=lambda: sim.now
    )
    client.metadata.write("root", sim.first_root)

    async def emit(name: str, body: dict[str, Any]) -> None:
        events.append((name, body))

    daemon_side = _DaemonInstaller(installer, install, lambda: base)
    updater = Updater(client, control, daemon_side, emit, tmp_path / "ota2" / "updater.json")
    assert await updater.check() == "current" and installed == []
    assert daemon_side.active_path() == base_file  # a delta patches against the base

    other = "models/digits/1.3.0.edb"
    sim.add_target(other, b"newer" * 300, model="digits", version="1.3.0")
    control.answer = Assignment("r2", other, "1.3.0")
    assert await updater.check() == "committed" and installed == ["1.3.0"]
