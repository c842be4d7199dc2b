"""The A/B model slots on real files: every transition is one atomic write, a changed file is
never served, a corrupt slots.json is recovered from the slots themselves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edged.errors import ModelError
from edged.ota import slots as slots_module
from edged.ota.install import load_serving
from edged.ota.slots import SlotError, Slots, SlotsState, file_sha256
from edged_formats import Manifest, write_bundle
from tests.unit.edged_formats.samples import manifest_dict, members


def bundle(version: str) -> bytes:
    """A valid bundle (no interpreter needed) of `version`."""
    doc = manifest_dict()
    doc["version"] = version
    return write_bundle(Manifest.from_dict(doc), members())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "factory.edb"
    path.write_bytes(bundle("1.0.0"))
    return path


@pytest.fixture
def slots(tmp_path: Path, factory: Path) -> Slots:
    s = Slots(tmp_path / "models", clock=Clock())
    assert s.adopt(factory)
    return s


def reopened(s: Slots, factory: Path) -> Slots:
    """The same directory as a fresh start would see it."""
    again = Slots(s.root)
    assert not again.adopt(factory)
    return again


def on_disk(s: Slots) -> dict:
    return json.loads(s.path.read_bytes())


def test_first_start_adopts_the_configured_bundle_as_known_good(slots, factory) -> None:
    """No slots.json: the configured bundle is copied into slot a, active and known good."""
    state = slots.state
    assert (state.active, state.known_good, state.trial) == ("a", "a", None)
    assert slots.active_path() == slots.root / "a" / "bundle.edb"
    assert slots.active_path().read_bytes() == factory.read_bytes()
    assert state.held["a"].version == "1.0.0"
    assert on_disk(slots)["slots"]["a"]["sha256"] == file_sha256(factory)
    assert on_disk(slots)["factory_sha256"] == file_sha256(factory)
    slots.verify("a")


def test_a_later_start_reads_the_state_and_copies_nothing(slots, factory) -> None:
    """With slots.json present adopt() only loads it, even if the configured file changed."""
    factory.write_bytes(bundle("9.9.9"))
    again = reopened(slots, factory)
    assert again.state == slots.state
    assert again.state.held["a"].version == "1.0.0"


def test_stage_writes_the_inactive_slot_and_changes_no_state(slots, factory) -> None:
    """stage() fills slot b and its record; slots.json is byte for byte what it was."""
    before = slots.path.read_bytes()
    data = bundle("1.1.0")
    path = slots.stage(data, sha(data), "1.1.0")
    assert path == slots.root / "b" / "bundle.edb" and path.read_bytes() == data
    assert slots.path.read_bytes() == before
    assert reopened(slots, factory).state.active == "a"


def test_stage_refuses_bytes_that_do_not_match_their_sha256(slots) -> None:
    """The digest given with the bytes is checked before anything is written."""
    data = bundle("1.1.0")
    with pytest.raises(SlotError, match="does not match its sha256"):
        slots.stage(data, sha(b"other"), "1.1.0")
    assert not (slots.root / "b" / "bundle.edb").exists()


def test_stage_catches_an_artifact_modified_on_disk_after_the_write(slots, monkeypatch) -> None:
    """The file is read back after its fsync: a disk that does not keep what was written (or
    a writer racing the install) is refused, and begin_trial will not switch to it."""
    real_write = slots_module.atomic_write

    def tampering_write(path: Path, data: bytes, mode: int = 0o644) -> None:
        real_write(path, data[:-1] + b"\x01" if path.name == "bundle.edb" else data, mode)

    monkeypatch.setattr(slots_module, "atomic_write", tampering_write)
    data = bundle("1.1.0")
    with pytest.raises(SlotError, match="artifact modified on disk between verification"):
        slots.stage(data, sha(data), "1.1.0")
    monkeypatch.setattr(slots_module, "atomic_write", real_write)
    with pytest.raises(SlotError, match="does not verify; not switching"):
        slots.begin_trial()
    assert slots.state.active == "a"


def test_begin_trial_refuses_a_staged_file_changed_after_staging(slots) -> None:
    """A staged bundle altered before the switch is checked again and not switched to."""
    data = bundle("1.1.0")
    path = slots.stage(data, sha(data), "1.1.0")
    path.write_bytes(data + b"tail")
    with pytest.raises(SlotError, match="does not verify"):
        slots.begin_trial()
    assert (slots.state.active, slots.state.trial) == ("a", None)


def test_begin_trial_switches_and_records_the_trial_in_one_write(slots, factory) -> None:
    """After begin_trial a fresh start sees slot b active, in trial with one attempt, slot a
    still known good, and the baseline kept."""
    data = bundle("1.1.0")
    slots.stage(data, sha(data), "1.1.0")
    trial = slots.begin_trial(
        {"samples": 10, "mean_confidence": 0.9}, factory_sha256="f" * 64, context={"rollout": "r"}
    )
    assert (trial.slot, trial.version, trial.sha256, trial.attempts) == ("b", "1.1.0", sha(data), 1)
    state = reopened(slots, factory).state
    assert (state.active, state.known_good) == ("b", "a")
    assert state.trial == trial and state.trial.baseline["mean_confidence"] == 0.9
    assert state.factory_sha256 == "f" * 64 and state.trial.context == {"rollout": "r"}
    with pytest.raises(SlotError, match="in progress"):
        slots.stage(data, sha(data), "1.2.0")  # slot a is known good: never overwritten now


def test_commit_makes_the_trial_the_known_good(slots, factory) -> None:
    """commit(): known_good := active, trial cleared; the next stage goes to slot a."""
    data = bundle("1.1.0")
    slots.stage(data, sha(data), "1.1.0")
    slots.begin_trial()
    slots.commit()
    state = reopened(slots, factory).state
    assert (state.active, state.known_good, state.trial) == ("b", "b", None)
    assert set(state.held) == {"b"}
    nxt = bundle("1.2.0")
    assert slots.stage(nxt, sha(nxt), "1.2.0") == slots.root / "a" / "bundle.edb"
    with pytest.raises(SlotError, match="no trial"):
        slots.commit()


def test_rollback_restores_known_good_and_keeps_the_reason(slots, factory) -> None:
    """rollback(reason): active := known good, trial cleared, the reason in last_rollback."""
    data = bundle("1.1.0")
    slots.stage(data, sha(data), "1.1.0")
    slots.begin_trial()
    slots.rollback("canaries: 60% agree")
    state = reopened(slots, factory).state
    assert (state.active, state.known_good, state.trial) == ("a", "a", None)
    assert state.last_rollback is not None
    assert state.last_rollback["reason"] == "canaries: 60% agree"
    assert state.last_rollback["version"] == "1.1.0"
    assert slots.status()["last_rollback"]["slot"] == "b"
    with pytest.raises(SlotError, match="nothing to roll back"):
        slots.rollback("again")


def test_count_start_counts_before_loading_and_rolls_back_past_the_cap(slots, factory) -> None:
    """Each start with a trial writes attempts + 1 first; the start that would exceed
    max_start_attempts rolls back instead, saying it was a crash loop."""
    data = bundle("1.1.0")
    slots.stage(data, sha(data), "1.1.0")
    slots.begin_trial()  # the switch is attempt 1
    for attempts in (2, 3):
        start = reopened(slots, factory)
        assert start.count_start(3) is None
        assert reopened(start, factory).state.trial.attempts == attempts
    start = reopened(slots, factory)
    reason = start.count_start(3)
    assert reason is not None and "crash loop" in reason and "3 times" in reason
    state = reopened(start, factory).state
    assert (state.active, state.trial) == ("a", None)
    assert state.last_rollback["reason"] == reason
    assert start.count_start(3) is None  # nothing recorded: a start without a trial


def test_verify_refuses_a_served_file_that_changed(slots) -> None:
    """A slot whose file no longer has its recorded sha256 is never served."""
    slots.active_path().write_bytes(b"bit rot")
    with pytest.raises(SlotError, match="does not match its sha256 on disk"):
        slots.verify("a")
    with pytest.raises(SlotError, match="not named"):
        slots.verify("b")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"format": 2}', b'{"format": 1, "active": "c"}', b"\xff\xfe"],
)
def test_corrupt_slots_json_falls_back_to_the_older_verified_slot(slots, factory, content) -> None:
    """An unreadable or untrustworthy slots.json is not a crash: the older slot that verifies
    (the known good one when the newer was staged) serves, slots.json is rewritten and a
    note says why."""
    data = bundle("1.1.0")
    slots.stage(data, sha(data), "1.1.0")
    slots.begin_trial()
    slots.path.write_bytes(content)
    again = Slots(slots.root)
    assert not again.adopt(factory)
    assert (again.state.active, again.state.known_good, again.state.trial) == ("a", "a", None)
    again.verify("a")
    (name, detail), *_ = again.notes
    assert name == "ota.slots_recovered" and "slot a (1.0.0)" in detail["serving"]
    assert reopened(again, factory).state == again.state


def test_recovery_takes_the_newer_slot_when_the_older_does_not_verify(slots, factory) -> None:
    """With the older slot damaged too, the newer slot that verifies serves."""
    data = bundle("1.1.0")
    slots.stage(data, sha(data), "1.1.0")
    slots.active_path().write_bytes(b"damaged")
    slots.path.write_text("garbage")
    again = Slots(slots.root)
    again.adopt(factory)
    assert again.state.active == "b" and again.state.held["b"].version == "1.1.0"


def test_recovery_with_no_verifying_slot_adopts_the_configured_bundle(slots, factory) -> None:
    """Nothing on disk verifies: the configured bundle is adopted again."""
    slots.active_path().write_bytes(b"damaged")
    slots.path.write_text("garbage")
    again = Slots(slots.root)
    again.adopt(factory)
    again.verify("a")
    assert "the configured model" in again.notes[0][1]["serving"]


def test_first_start_without_a_readable_model_is_one_clear_error(tmp_path) -> None:
    """No slots and no configured file: SlotError naming the file, nothing written."""
    s = Slots(tmp_path / "models")
    with pytest.raises(SlotError, match=r"cannot be read"):
        s.adopt(tmp_path / "missing.edb")
    assert not s.path.exists()


def test_inconsistent_states_are_refused() -> None:
    """The invariants hold on every state: a trial exactly when active != known good, naming
    the active slot, and records for both named slots."""
    held = {"a": slots_module.Held("1", "0" * 64)}
    with pytest.raises(ValueError, match="exactly when"):
        SlotsState("b", "a", held | {"b": slots_module.Held("2", "1" * 64)})
    with pytest.raises(ValueError, match="describe"):
        SlotsState("a", "a", {})
    assert SlotsState.from_json(SlotsState("a", "a", held).to_json()) == SlotsState("a", "a", held)


def staged_trial(slots: Slots, version: str = "1.1.0") -> None:
    data = bundle(version)
    slots.stage(data, sha(data), version)
    slots.begin_trial()


def test_start_loads_the_active_slot_after_counting_the_trial(slots, factory) -> None:
    """load_serving: a recorded trial is counted first, then its slot's file is loaded."""
    staged_trial(slots)
    loaded: list[Path] = []
    engine, notes = load_serving(slots, factory, 3, lambda path: loaded.append(path) or "engine")
    assert engine == "engine" and loaded == [slots.root / "b" / "bundle.edb"]
    assert notes == [("ota.trial_resumed", {"version": "1.1.0", "attempts": 2})]
    assert reopened(slots, factory).state.trial.attempts == 2


def test_a_trial_model_that_does_not_load_is_rolled_back_at_start(slots, factory) -> None:
    """The active (trial) model raising ModelError, or its file not verifying, is rolled back
    and the known good one loaded; the rollback is a note for the outbox."""
    staged_trial(slots)

    def load(path: Path) -> str:
        if path.parent.name == "b":
            raise ModelError("the runtime refused the model")
        return "known good"

    engine, notes = load_serving(slots, factory, 3, load)
    assert engine == "known good" and slots.state.active == "a"
    name, detail = notes[-1]
    assert name == "ota.rolled_back" and detail["restored"] == "1.0.0"
    assert detail["reason"] == "does not load: the runtime refused the model"
    staged_trial(slots, "1.2.0")
    slots.active_path().write_bytes(b"changed")
    engine, notes = load_serving(Slots(slots.root), factory, 3, load)
    assert engine == "known good" and "does not match its sha256" in notes[-1][1]["reason"]


def test_a_known_good_model_that_cannot_be_served_falls_back(slots, factory) -> None:
    """A rotted known good file falls back to the configured bundle (adopted into the other
    slot); only when nothing loads is it one ModelError naming both failures."""
    slots.active_path().write_bytes(b"rotted")
    engine, notes = load_serving(Slots(slots.root), factory, 3, lambda path: path)
    assert engine == slots.root / "b" / "bundle.edb"
    assert notes[0][0] == "ota.slots_recovered" and "does not match" in notes[0][1]["reason"]
    assert reopened(slots, factory).state.active == "b"

    def load(path: Path) -> str:
        raise ModelError("broken")

    with pytest.raises(ModelError, match=r"known good one failed \(broken\), and so did"):
        load_serving(Slots(slots.root), factory, 3, load)
