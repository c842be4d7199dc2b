"""The systemd launcher end to end without systemd: a real `edged run` daemon with
`[finetune] launcher = "systemd"` hands its job over through the request file, and `PathUnit`
plays edged-finetune.path and edged-finetune.service from the unit files themselves (the
watched path, ExecStart= and Environment=, with /opt/edged/bin/python and /var/lib/edged
replaced by this interpreter and the test's state directory), so the units and the daemon are
held to the same contract. The candidate installs through the slots and the trial; a daemon
restarted while the unit's worker runs waits for that worker instead of starting another and
installs its result; a request no unit picks up is reported in one sentence."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from edged.engine import open_bundle
from edged.finetune.launchers import not_started
from edged.finetune.request import REQUEST_FILE, RUNNING_FILE
from edged.labels import Label, LabelStore
from tests.support.daemon import DaemonProcess, render_toml

pytestmark = [pytest.mark.train, pytest.mark.slow]
pytest.importorskip("scipy", reason="scipy (train extra) rotates the drifted digits")

SYSTEMD = Path(__file__).resolve().parents[4] / "systemd"
DEGREES, LABELS, BASE = 25, 300, "1.0.0"


def _unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and their (repeatable) settings."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


class PathUnit:
    """edged-finetune.path + edged-finetune.service as systemd would run them: whenever the
    watched file exists, the service's ExecStart= runs to its end, one at a time. A request
    still there after a run is counted in `retriggers` (systemd would start the service again
    at once, for ever)."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None) -> None:
        path_unit = _unit_file(SYSTEMD / "edged-finetune.path")
        service = _unit_file(SYSTEMD / "edged-finetune.service")
        assert path_unit["Path"]["Unit"] == ["edged-finetune.service"]
        assert service["Service"]["Type"] == ["oneshot"]

        def host(text: str) -> str:
            text = text.replace("/opt/edged/bin/python", sys.executable)
            return text.replace("/var/lib/edged", str(state_dir))

        (watched,) = path_unit["Path"]["PathExists"]
        self.watched = Path(host(watched))
        assert self.watched == state_dir / "finetune" / REQUEST_FILE
        (exec_start,) = service["Service"]["ExecStart"]
        self.command = [host(word) for word in shlex.split(exec_start)]
        variables = [w for v in service["Service"].get("Environment", []) for w in shlex.split(v)]
        self.env = {**os.environ, **dict(v.split("=", 1) for v in variables), **(env or {})}
        self.runs: list[tuple[int, str]] = []
        self.retriggers = 0
        self.current: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PathUnit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        current = self.current
        if current is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(current.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            current.kill()
        self._thread.join(30)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.watched.exists():
                self.current = subprocess.Popen(
                    self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                _, stderr = self.current.communicate()
                self.runs.append((self.current.returncode, stderr.decode(errors="replace")))
                self.current = None
                if self.watched.exists():
                    self.retriggers += 1
                    if self.retriggers >= 3:
                        return
            time.sleep(0.05)

    def stopped_worker(self) -> psutil.Process | None:
        """The worker once it stopped itself at a fault point."""
        current = self.current
        if current is None:
            return None
        try:
            children = psutil.Process(current.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if child.status() == psutil.STATUS_STOPPED:
                    return child
            except psutil.NoSuchProcess:
                continue
        return None


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def drifted() -> dict[str, np.ndarray]:
    """Rotated digits: 300 of the training and validation split to label, the test split."""
    from control_plane.toolchain.datasets import digits_dataset, rotated

    data = digits_dataset()
    x = rotated(np.concatenate([data.x_train, data.x_val]), DEGREES)
    y = np.concatenate([data.y_train, data.y_val])
    pick = np.random.default_rng(0).choice(len(y), LABELS, replace=False)
    return {"x": x[pick], "y": y[pick], "test_x": rotated(data.x_test, DEGREES)}


async def _store_labels(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    async with LabelStore(path) as store:
        for i, (sample, label) in enumerate(zip(x, y, strict=True)):
            await store.add(Label(f"s{i}", int(label), "local", sample, None, None))


def _setup(tmp_path: Path, short_dir: Path, digits_build: Any, data: dict[str, Any], **ft: Any):
    """The daemon's configuration, its state directory holding 300 true labels of rotated
    digits (as the truth topic would have stored them), and a live source of rotated digits
    for the trial."""
    out, report = digits_build
    bundle = out / report.bundle
    dtype = np.dtype(open_bundle(bundle).manifest.input.dtype)
    state = tmp_path / "state"
    state.mkdir()
    asyncio.run(_store_labels(state / "labels.db", data["x"].astype(dtype), data["y"]))
    np.savez(tmp_path / "eval.npz", x=data["test_x"])
    config = tmp_path / "edged.toml"
    finetune = {
        "enabled": True,
        "launcher": "systemd",
        "min_labels": LABELS,
        "min_new_labels": LABELS,
        "min_interval_s": 0,
        **ft,
    }
    config.write_text(
        render_toml(
            {
                "device": {"state_dir": str(state), "model": str(bundle)},
                "source": [
                    {
                        "kind": "replay",
                        "name": "eval",
                        "path": str(tmp_path / "eval.npz"),
                        "rate_hz": 100,
                        "loop": True,
                    }
                ],
                "uplink": {"enabled": False},
                "outbox": {"min_free_mb": 0},
                "update": {"watch_s": 2, "min_watch_samples": 20, "max_latency_ratio": 50.0},
                "finetune": finetune,
                "status": {"socket": str(short_dir / "status.sock")},
            }
        )
    )
    return config, state


def _settled(daemon: DaemonProcess) -> bool:
    """A personalised model committed and its job reported (the report follows the trial)."""
    status = daemon.status()
    installed = status["model"]["version"] != BASE and not status["slots"]["trial"]
    return installed and status["finetune"]["last"] is not None


def test_the_daemon_hands_the_job_to_the_unit_and_installs_its_candidate(
    tmp_path, short_dir, digits_build, drifted
) -> None:
    """launcher = "systemd": the unit runs the worker once, the request is gone after it, and
    the accepted candidate installs through the slots and the trial."""
    config, state = _setup(tmp_path, short_dir, digits_build, drifted)
    with PathUnit(state) as unit, DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: _settled(daemon), 90, "the candidate installed")
        status = daemon.status()
        assert status["model"] == {
            "name": status["model"]["name"],
            "version": f"{BASE}+local.1",
            "base": BASE,
        }
        last = status["finetune"]["last"]
        assert last["verdict"] == "installed" and last["install"] == "committed", last
        assert last["trigger"] == "labels" and last["worker_wall_s"] > 0
        assert daemon.terminate() == 0
    assert [code for code, _ in unit.runs] == [0], unit.runs
    assert "job 1: accepted" in unit.runs[0][1]
    assert unit.retriggers == 0
    assert not (state / "finetune" / REQUEST_FILE).exists()
    assert not (state / "finetune" / RUNNING_FILE).exists()
    assert json.loads((state / "finetune" / "state.json").read_text())["pending_job"] is None


def test_a_restarted_daemon_waits_for_the_units_worker_and_installs_its_result(
    tmp_path, short_dir, digits_build, drifted
) -> None:
    """The daemon stops while the unit's worker runs (held at a fault point): the next daemon
    starts no second worker, waits for that one and installs its candidate."""
    config, state = _setup(tmp_path, short_dir, digits_build, drifted)
    with PathUnit(state, env={"EDGED_FAULT_PAUSE_AT": "finetune_embedded"}) as unit:
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.wait_ready()
            daemon.wait_for(lambda: unit.stopped_worker() is not None, 60, "the unit's worker")
            assert daemon.terminate() == 0
        assert json.loads((state / "finetune" / "state.json").read_text())["pending_job"] == 1
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.wait_ready()
            daemon.wait_for(lambda: daemon.status()["finetune"]["running"], 30, "the resume")
            time.sleep(1)
            assert not (state / "finetune" / REQUEST_FILE).exists()  # no second job
            worker = unit.stopped_worker()
            assert worker is not None
            worker.send_signal(signal.SIGCONT)
            daemon.wait_for(lambda: _settled(daemon), 90, "the candidate installed")
            last = daemon.status()["finetune"]["last"]
            assert last["verdict"] == "installed" and last["resumed"] is True, last
            assert last["job"] == 1 and daemon.status()["finetune"]["jobs"] == 1
            assert daemon.terminate() == 0
    assert [code for code, _ in unit.runs] == [0] and unit.retriggers == 0, unit.runs


def test_a_request_no_unit_picks_up_is_reported_and_withdrawn(
    tmp_path, short_dir, digits_build, drifted
) -> None:
    """No path unit enabled: the job fails with the sentence naming the unit, the request is
    withdrawn, and the daemon keeps serving its model."""
    config, state = _setup(tmp_path, short_dir, digits_build, drifted, systemd_start_s=1)
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: daemon.status()["finetune"]["last"] is not None, 60, "a verdict")
        last = daemon.status()["finetune"]["last"]
        assert last["verdict"] == "failed" and last["reason"] == not_started(1.0), last
        assert daemon.status()["model"]["version"] == BASE
        assert daemon.terminate() == 0
    assert not (state / "finetune" / REQUEST_FILE).exists()
