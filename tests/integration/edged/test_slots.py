"""Model installs in a real `edged run`: A/B slots, the health trial, rollback, crash loops and
kill -9 at every step. A changed `device.model` plus SIGHUP drives `Daemon.install`, the same
entry point the updater uses."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.ota.slots import FAULT_ENV, Slots
from edged.outbox import Outbox, OutboxConfig
from edged_formats import Manifest, read_bundle, write_bundle
from tests.support.daemon import DaemonProcess, render_toml

CONTEXT = {"rollout": "r-1", "target": "models/digits/1.1.0.edb"}
UPDATE = {"watch_s": 1.5, "min_watch_samples": 20, "max_latency_ratio": 50.0}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path for unix sockets (107-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


@pytest.fixture
def models(digits_build, tmp_path: Path) -> dict[str, Path]:
    """The digits bundle (1.0.0), the same model as 1.1.0, and 1.1.0-bad whose manifest
    expects other canary answers (it loads and serves, and fails its health check)."""
    out, context = digits_build
    original = out / context.bundle
    bundle = read_bundle(original.read_bytes())
    good = dataclasses.replace(bundle.manifest, version="1.1.0")
    shifted = tuple((i + 1) % 10 for i in bundle.manifest.canaries.expected_top1)
    bad = dataclasses.replace(
        bundle.manifest,
        version="1.1.0-bad",
        canaries=dataclasses.replace(bundle.manifest.canaries, expected_top1=shifted),
    )
    paths = {"1.0.0": original, "1.1.0": tmp_path / "v110.edb", "bad": tmp_path / "bad.edb"}
    paths["1.1.0"].write_bytes(write_bundle(good, bundle.members))
    paths["bad"].write_bytes(write_bundle(bad, bundle.members))
    paths["data"] = out / "digits-test.npz"
    return paths


def write_config(
    tmp_path: Path, short_dir: Path, models: dict[str, Path], model: str, **update: Any
) -> Path:
    body = {
        "device": {"state_dir": str(tmp_path / "state"), "model": str(models[model])},
        "source": [
            {"kind": "replay", "name": "d", "path": str(models["data"]), "rate_hz": 200.0}
            | {"loop": True}
        ],
        "uplink": {"enabled": False},
        "outbox": {"min_free_mb": 0},
        "update": {**UPDATE, **update},
        "status": {"socket": str(short_dir / "status.sock")},
    }
    path = tmp_path / "edged.toml"
    path.write_text(render_toml(body))
    return path


def switch_to(daemon: DaemonProcess, config: Path, models: dict[str, Path], model: str) -> None:
    """Point device.model at another bundle and SIGHUP: the daemon installs it."""
    config.write_text(config.read_text().replace(str(models["1.0.0"]), str(models[model])))
    daemon.signal(signal.SIGHUP)


def on_disk(tmp_path: Path) -> Slots:
    """The slots as the next start will read them (slots.json must be valid: no recovery)."""
    slots = Slots(tmp_path / "state" / "models")
    assert not slots.adopt(Path("/nonexistent"))
    assert not slots.notes, slots.notes
    slots.verify(slots.state.active)
    slots.verify(slots.state.known_good)
    return slots


def events(tmp_path: Path) -> list[dict[str, Any]]:
    """The ota.* events the daemon stored in its outbox, in order."""

    async def read() -> list[dict[str, Any]]:
        config = OutboxConfig(tmp_path / "state" / "outbox.db", min_free_bytes=0)
        async with Outbox(config) as outbox:
            records = await outbox.lease(100_000, 1 << 30)
        return [r.body for r in records if r.kind == "event" and r.body["name"].startswith("ota.")]

    return asyncio.run(read())


def serving(daemon: DaemonProcess) -> tuple[str, str, str, Any]:
    """(engine version, active version, known good version, trial) from `edged status`."""
    status = daemon.status()
    slots = status["slots"]
    return (
        status["model"]["version"],
        slots["active"]["version"],
        slots["known_good"]["version"],
        slots["trial"],
    )


def inferred(daemon: DaemonProcess) -> int:
    return int(daemon.status()["counts"]["inferred"])


def stopped(daemon: DaemonProcess) -> bool:
    assert daemon.process is not None
    stat = Path(f"/proc/{daemon.process.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def test_a_good_model_passes_its_trial_and_is_committed(tmp_path, short_dir, models) -> None:
    """1.0.0 adopted on the first start; 1.1.0 is staged into slot b, switched to, passes
    canaries and the watch, and becomes the known good model: staged, switched, committed."""
    config = write_config(tmp_path, short_dir, models, "1.0.0")
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        assert serving(daemon) == ("1.0.0", "1.0.0", "1.0.0", None)
        daemon.wait_for(lambda: inferred(daemon) > 100, 20, "a baseline of traffic")
        switch_to(daemon, config, models, "1.1.0")
        daemon.wait_for(lambda: "event=ota.committed" in daemon.log(), 30, "the commit")
        assert serving(daemon) == ("1.1.0", "1.1.0", "1.1.0", None)
        assert daemon.terminate() == 0
    names = [e["name"] for e in events(tmp_path)]
    assert names == ["ota.staged", "ota.switched", "ota.committed"]
    committed = events(tmp_path)[-1]
    assert committed["canary_agreement"] == 1.0 and committed["error_rate"] == 0
    assert committed["samples"] >= 20 and committed["baseline_samples"] > 0
    assert abs(committed["confidence_after"] - committed["confidence_before"]) < 0.05
    assert committed["latency_ratio"] is not None
    assert on_disk(tmp_path).state.active == "b"


def test_a_model_failing_its_canaries_is_rolled_back(tmp_path, short_dir, models) -> None:
    """A bundle that loads but fails its canaries is switched to, rolled back, and the daemon
    keeps serving 1.0.0 without a pause in inference; the reason is kept, reported as
    ota.rolled_back, and a restart does not try it again."""
    config = write_config(tmp_path, short_dir, models, "1.0.0")
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: inferred(daemon) > 50, 20, "traffic")
        switch_to(daemon, config, models, "bad")
        daemon.wait_for(lambda: "event=ota.rolled_back" in daemon.log(), 30, "the rollback")
        assert serving(daemon) == ("1.0.0", "1.0.0", "1.0.0", None)
        rollback = daemon.status()["slots"]["last_rollback"]
        assert rollback["version"] == "1.1.0-bad" and rollback["reason"].startswith("canaries")
        before = inferred(daemon)
        daemon.wait_for(lambda: inferred(daemon) > before + 50, 10, "inference to go on")
        assert daemon.terminate() == 0
    stored = events(tmp_path)
    assert [e["name"] for e in stored] == ["ota.staged", "ota.switched", "ota.rolled_back"]
    assert stored[-1]["restored"] == "1.0.0" and "agree with the manifest" in stored[-1]["reason"]
    with DaemonProcess(config, tmp_path) as again:
        again.wait_ready()
        assert serving(again) == ("1.0.0", "1.0.0", "1.0.0", None)
        time.sleep(1)
        assert "configured_model_changed" not in again.log()
        assert again.terminate() == 0


def test_a_trial_at_its_start_cap_is_rolled_back_before_loading(
    tmp_path, short_dir, models
) -> None:
    """slots.json with a trial already started max_start_attempts times: the next start
    rolls back to the known good model without loading the trial model."""
    config = write_config(tmp_path, short_dir, models, "1.0.0", max_start_attempts=3)
    with DaemonProcess(config, tmp_path) as first:
        first.wait_ready()
        assert first.terminate() == 0
    slots = on_disk(tmp_path)
    data = models["1.1.0"].read_bytes()
    slots.stage(data, hashlib.sha256(data).hexdigest(), "1.1.0")
    slots.begin_trial()
    doc = json.loads(slots.path.read_text())
    doc["trial"]["attempts"] = 3
    slots.path.write_text(json.dumps(doc))
    with DaemonProcess(config, tmp_path) as second:
        second.wait_ready()
        assert serving(second) == ("1.0.0", "1.0.0", "1.0.0", None)
        assert "crash loop" in second.status()["slots"]["last_rollback"]["reason"]
        ready = next(line for line in second.log().splitlines() if "event=ready" in line)
        assert "version=1.0.0" in ready and "ota.trial_resumed" not in second.log()
        assert second.terminate() == 0
    assert [e["name"] for e in events(tmp_path)] == ["ota.rolled_back"]


def test_a_trial_model_that_does_not_load_is_rolled_back_at_start(
    tmp_path, short_dir, models
) -> None:
    """A trial slot whose bundle is well-formed but that the runtime refuses: the start rolls
    back to the known good model and serves it, and says why."""
    from tests.unit.edged_formats.samples import manifest_dict, members

    config = write_config(tmp_path, short_dir, models, "1.0.0")
    with DaemonProcess(config, tmp_path) as first:
        first.wait_ready()
        assert first.terminate() == 0
    broken = write_bundle(Manifest.from_dict(manifest_dict()), members())  # no real flatbuffer
    slots = on_disk(tmp_path)
    slots.stage(broken, hashlib.sha256(broken).hexdigest(), "1.2.0")
    slots.begin_trial()
    with DaemonProcess(config, tmp_path) as second:
        second.wait_ready()
        assert serving(second) == ("1.0.0", "1.0.0", "1.0.0", None)
        reason = second.status()["slots"]["last_rollback"]["reason"]
        assert reason.startswith("does not load:") and "refused the model" in reason
        assert second.terminate() == 0
    assert [e["name"] for e in events(tmp_path)] == ["ota.trial_resumed", "ota.rolled_back"]


def test_a_crash_loop_after_the_switch_rolls_back_on_the_next_start(
    tmp_path, short_dir, models
) -> None:
    """kill -9 while 1.1.0 is on trial, twice (max_start_attempts = 2): the first restart
    serves it again and counts the attempt, the second rolls back to 1.0.0 before loading."""
    config = write_config(tmp_path, short_dir, models, "1.0.0", max_start_attempts=2, watch_s=600.0)
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        switch_to(daemon, config, models, "1.1.0")
        daemon.wait_for(lambda: "event=model_swapped" in daemon.log(), 30, "the swap")
        daemon.kill()
    assert on_disk(tmp_path).state.trial.attempts == 1
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        version, active, good, trial = serving(daemon)
        assert (version, active, good, trial["attempts"]) == ("1.1.0", "1.1.0", "1.0.0", 2)
        daemon.wait_for(lambda: daemon.status()["slots"]["watch"] is not None, 10, "the watch")
        daemon.kill()
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        assert serving(daemon) == ("1.0.0", "1.0.0", "1.0.0", None)
        reason = daemon.status()["slots"]["last_rollback"]["reason"]
        assert "crash loop: 1.1.0 was started 2 times" in reason
        assert daemon.terminate() == 0
    names = [e["name"] for e in events(tmp_path)]
    assert names == ["ota.staged", "ota.switched", "ota.trial_resumed", "ota.rolled_back"]


# Where each step's kill -9 leaves slots.json: (active, known_good, trial attempts or None).
STEPS = {
    ("1.1.0", "stage.written"): ("1.0.0", "1.0.0", None),
    ("1.1.0", "staged"): ("1.0.0", "1.0.0", None),
    ("1.1.0", "switched"): ("1.1.0", "1.0.0", 1),
    ("1.1.0", "swapped"): ("1.1.0", "1.0.0", 1),
    ("1.1.0", "committed"): ("1.1.0", "1.1.0", None),
    ("bad", "rolled_back"): ("1.0.0", "1.0.0", None),
}


@pytest.mark.parametrize(("model", "step"), list(STEPS), ids=[s for _, s in STEPS])
def test_kill_9_at_every_step_leaves_one_verified_model(
    tmp_path, short_dir, models, model, step
) -> None:
    """The daemon frozen at a step of stage/switch/trial/commit (or rollback) and killed: on
    disk slots.json is valid and names verified files, old or new state, nothing between;
    the restart serves exactly the active slot's model and ends with one known good model
    (1.1.0 when that was installed, 1.0.0 after the bad one)."""
    config = write_config(tmp_path, short_dir, models, "1.0.0")
    with DaemonProcess(config, tmp_path, env={FAULT_ENV: step}) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: inferred(daemon) > 50, 20, "traffic")
        switch_to(daemon, config, models, model)
        daemon.wait_for(lambda: stopped(daemon), 30, f"the pause at {step}")
        assert f"event=fault_pause step={step}" in daemon.log()
        daemon.kill()
    slots = on_disk(tmp_path)
    trial = slots.state.trial
    state = slots.status()
    got = (state["active"]["version"], state["known_good"]["version"], trial and trial.attempts)
    assert got == STEPS[(model, step)]
    final = "1.0.0" if model == "bad" else "1.1.0"
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        ready = next(line for line in daemon.log().splitlines() if "event=ready" in line)
        assert f"version={got[0]} slot={slots.state.active}" in ready  # what the kill left
        daemon.wait_for(
            lambda: serving(daemon) == (final, final, final, None), 30, "one known good model"
        )
        assert daemon.terminate() == 0
    settled = on_disk(tmp_path).state
    assert settled.active == settled.known_good and settled.trial is None


def _installer(slots: Slots, engine: Any, emit: Any) -> Any:
    """An Installer on a real engine, watching 30 s of traffic, its events to `emit`."""
    from edged.config import UpdateConfig
    from edged.ota.install import Installer

    return Installer(
        slots,
        engine,
        update=lambda: UpdateConfig(watch_s=30),
        model_swapped=lambda: None,
        inference_errors=lambda: 0,
        emit=emit,
        restore_failed=lambda reason: None,
    )


async def test_refused_installs_change_nothing(tmp_path, models, tf_bundles) -> None:
    """Installer on a real engine: a wrong sha256, a file that is not a bundle, a version the
    metadata did not name, a model for other inputs, and a second install during a trial are
    each refused with ota.refused and their reason; slots.json and the served model are as
    they were. The context fields (rollout, target) ride on every event, and in the trial
    record across a restart."""
    from edged.engine import Engine
    from edged.ota.install import load_serving

    slots = Slots(tmp_path / "models")
    engine, _ = load_serving(slots, models["1.0.0"], 3, Engine.from_file)
    emitted: list[tuple[str, dict[str, Any]]] = []

    async def emit(name: str, **detail: Any) -> None:
        emitted.append((name, detail))

    installer = _installer(slots, engine, emit)
    before = slots.path.read_bytes()
    assert installer.active_sha256() == hashlib.sha256(models["1.0.0"].read_bytes()).hexdigest()
    assert installer.active_path() == slots.root / "a" / "bundle.edb"
    good = models["1.1.0"].read_bytes()
    other = tf_bundles["digits_float"]
    cases = [
        (good, "0" * 64, "1.1.0", "does not match its sha256"),
        (b"not a bundle", hashlib.sha256(b"not a bundle").hexdigest(), "1.1.0", "not a servable"),
        (good, hashlib.sha256(good).hexdigest(), "1.2.0", "is version 1.1.0, not 1.2.0"),
        (other, hashlib.sha256(other.read_bytes()).hexdigest(), "1.0.0", "the bundle takes"),
    ]
    for bundle, digest, version, reason in cases:
        outcome = await installer.install(bundle, digest, version, context=CONTEXT)
        assert outcome.result == "refused" and reason in outcome.reason, outcome
        assert emitted[-1] == (
            "ota.refused",
            {**CONTEXT, "version": version, "reason": outcome.reason},
        )
        assert slots.path.read_bytes() == before and engine.manifest.version == "1.0.0"
    digest = hashlib.sha256(good).hexdigest()
    trial = asyncio.create_task(installer.install(good, digest, "1.1.0", context=CONTEXT))
    while installer.status()["watch"] is None:
        await asyncio.sleep(0.01)
    busy = await installer.install(good, hashlib.sha256(good).hexdigest(), "1.1.0")
    assert busy.result == "refused" and "in progress" in busy.reason
    assert engine.manifest.version == "1.1.0" and slots.state.trial is not None
    assert [name for name, _ in emitted[-3:]] == ["ota.staged", "ota.switched", "ota.refused"]
    assert all(detail["rollout"] == "r-1" for _, detail in emitted[-3:-1])
    trial.cancel()  # a stop mid-trial: the trial stays recorded for the next start
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert Slots(slots.root).adopt(models["1.0.0"]) is False
    assert json.loads(slots.path.read_bytes())["trial"]["version"] == "1.1.0"
    _, notes = load_serving(Slots(slots.root), models["1.0.0"], 1, Engine.from_file)
    ((name, detail),) = notes  # max_start_attempts 1: this start rolls the trial back
    assert name == "ota.rolled_back" and {**detail, **CONTEXT} == detail
    assert detail["restored"] == "1.0.0" and "crash loop" in detail["reason"]


async def test_a_return_to_the_base_is_not_judged_on_confidence(tmp_path, models) -> None:
    """judge_confidence=False (an operator's switch back from a personalised model) records
    the trial's baseline without the replaced model's mean confidence, so neither this trial
    nor one resumed after a restart rolls back on a confidence drop; latency and sample count
    stay. By default the confidence is recorded."""
    from edged.engine import Engine
    from edged.ota.install import load_serving

    async def emit(name: str, **detail: Any) -> None:
        pass

    good = models["1.1.0"].read_bytes()
    digest = hashlib.sha256(good).hexdigest()
    for judge, expected in ((False, None), (True, 0.97)):
        slots = Slots(tmp_path / "models")
        engine, _ = load_serving(slots, models["1.0.0"], 1, Engine.from_file)
        installer = _installer(slots, engine, emit)
        for _ in range(200):
            installer.traffic.add(0.97, 0.2)
        trial = asyncio.create_task(
            installer.install(good, digest, "1.1.0", judge_confidence=judge)
        )
        while installer.status()["watch"] is None:
            await asyncio.sleep(0.01)
        recorded = json.loads(slots.path.read_bytes())["trial"]["baseline"]
        assert recorded["samples"] == 200 and recorded["latency_p50_ms"] == 0.2
        if expected is None:
            assert recorded["mean_confidence"] is None
        else:
            assert recorded["mean_confidence"] == pytest.approx(expected)
        trial.cancel()  # recorded; the next start (max_start_attempts 1) rolls it back
        with pytest.raises(asyncio.CancelledError):
            await trial
