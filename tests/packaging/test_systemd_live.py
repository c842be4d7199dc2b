"""The device packages under a running systemd: a throwaway Debian root with both packages
installed is booted by systemd-nspawn (systemd as its PID 1, its own network namespace;
never the host's own /), and the units do what docs/systemd.md says: `systemctl enable --now
edged` reaches READY with its STATUS line, the daemon runs as its user inside its sandbox,
reloads on `systemctl reload`, is restarted after a kill and after a watchdog timeout, stops
cleanly, and the path unit starts the fine-tune worker's unit for a real job, which trains and
gates a candidate. Needs root, the package tools and systemd-container (`make deb-tools`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from control_plane.toolchain.datasets import digits_dataset, rotated
from edged.finetune.job import Job, JobLabels, write_job
from edged.finetune.request import Request
from tests.packaging.debroot import digest, ids, install, needs

pytestmark = pytest.mark.slow

STATE = Path("var/lib/edged")
# A test drop-in: the shipped 30 s watchdog would make the watchdog check slow.
WATCHDOG_DROP_IN = "[Service]\nWatchdogSec=4\n"


class Booted:
    """A root booted by systemd-nspawn; `run` executes a command inside it (nsenter into the
    namespaces of its systemd) and returns what it printed."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self._log = log.open("wb")
        self._nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",  # no machined on the host
                "--keep-unit",  # nor a host systemd to make a scope
                "--private-network",
                "--directory",
                str(root),
                "--boot",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.leader = self._find_leader(log)

    def _find_leader(self, log: Path) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self._nspawn.poll() is None, f"systemd-nspawn exited: {log.read_text()[-3000:]}"
            children = subprocess.run(
                ["pgrep", "-P", str(self._nspawn.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in children:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            time.sleep(0.2)
        raise AssertionError(f"no systemd came up in the container: {log.read_text()[-3000:]}")

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> str:
        process = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
        if check:
            assert process.returncode == 0, f"{argv}: {process.stdout[-3000:]}{process.stderr}"
        return process.stdout

    def wait_booted(self) -> str:
        """systemd's state once start-up finished (running, or degraded when some unit failed);
        asked again while its private socket is not yet up."""
        deadline = time.monotonic() + 120
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False).strip()
            if state in ("running", "degraded") or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit)

    def poweroff(self) -> None:
        if self._nspawn.poll() is None:
            self.run("systemctl", "poweroff", "--no-block", check=False)
            try:
                self._nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait()
        self._log.close()


def _until(what: str, probe: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def booted(debs: dict[str, Path], root: Path, digits_build, tmp_path: Path) -> Iterator[Booted]:
    needs(shutil.which("systemd-nspawn") is not None, "systemd-nspawn missing: `make deb-tools`")
    needs(shutil.which("nsenter") is not None, "nsenter (util-linux) missing")
    install(root, debs["edged-current"], debs["edged-finetune-current"])
    out, report = digits_build
    models = root / STATE / "models"
    models.mkdir()
    shutil.copy(out / report.bundle, models / "current.edb")
    os.chown(models, *ids(root))
    os.chown(models / "current.edb", *ids(root))
    drop_in = root / "etc" / "systemd" / "system" / "edged.service.d"
    drop_in.mkdir(parents=True)
    (drop_in / "test-watchdog.conf").write_text(WATCHDOG_DROP_IN)
    machine = Booted(root, tmp_path / "nspawn.log")
    try:
        yield machine
    finally:
        machine.poweroff()


def test_the_units_run_under_systemd(booted: Booted, root: Path) -> None:
    state = booted.wait_booted()
    failed = booted.run("systemctl", "--failed", "--no-legend", check=False)
    assert state in ("running", "degraded"), (state, failed)
    assert "edged" not in failed
    assert booted.run("systemctl", "is-active", "edged-finetune.path").strip() == "active"
    assert booted.run("systemctl", "is-enabled", "edged-firmware-bridge", check=False).strip() == (
        "disabled"
    )

    # The documented bootstrap's last step; READY comes once the model served its first sample.
    booted.run("systemctl", "enable", "--now", "edged")
    shown = booted.show("edged", "ActiveState", "StatusText", "MainPID", "NRestarts")
    assert shown["ActiveState"] == "active", booted.journal("edged")
    assert shown["StatusText"].startswith("model digits-cnn 1.0.0;"), shown
    status = booted.run("runuser", "-u", "edged", "--", "edged", "status")
    assert "digits-cnn 1.0.0" in status and "running" in status

    # Its sandbox is in force: its own user, no capabilities, no new privileges, a seccomp
    # filter, and a read-only root.
    pid = shown["MainPID"]
    proc = dict(
        line.split(":", 1) for line in booted.run("cat", f"/proc/{pid}/status").splitlines()
    )
    uid, _ = ids(root)
    assert proc["Uid"].split()[0] == str(uid)
    assert proc["CapEff"].strip() == "0000000000000000"
    assert proc["NoNewPrivs"].strip() == "1" and proc["Seccomp"].strip() == "2"
    mounts = booted.run("cat", f"/proc/{pid}/mountinfo").splitlines()
    root_mount = [line.split() for line in mounts if line.split()[4] == "/"][-1]
    assert root_mount[5].split(",")[0] == "ro", root_mount

    # `systemctl reload` reaches the daemon (SIGHUP) and it re-reads its configuration.
    booted.run("systemctl", "reload", "edged")
    _until("the reload", lambda: "event=reloaded" in booted.journal("edged"), 20)

    # Killed: restarted. Stuck (SIGSTOP, no watchdog pings): killed by the watchdog, restarted.
    booted.run("systemctl", "kill", "--signal=SIGKILL", "edged")
    _until("a restart after the kill", lambda: _running_after(booted, restarts=1), 30)
    booted.run("systemctl", "kill", "--signal=SIGSTOP", "--kill-who=main", "edged")
    _until("a restart after the watchdog", lambda: _running_after(booted, restarts=2), 30)
    assert "Watchdog timeout" in booted.run("journalctl", "--no-pager", "-u", "edged")

    # Stopped: SIGTERM drains and the daemon exits 0.
    booted.run("systemctl", "stop", "edged")
    stopped = booted.show("edged", "ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert "event=stopped" in booted.journal("edged")


def test_the_path_unit_runs_a_real_fine_tune_job(booted: Booted, root: Path) -> None:
    """A job as the daemon hands it over (docs/finetune.md, "Launchers"): 300 labelled
    rotated digits on the installed base; the path unit starts edged-finetune.service, whose
    worker trains, exports and gates a candidate inside the unit's sandbox."""
    booted.wait_booted()
    finetune = root / STATE / "finetune"
    jobs = finetune / "jobs"
    job_dir = jobs / "rotated-300"
    base = "/var/lib/edged/models/current.edb"
    data = digits_dataset()
    pick = np.random.default_rng(7).choice(len(data.x_train), 300, replace=False)
    job = Job(
        base=base,
        base_sha256=digest(root / base.lstrip("/")),
        current=base,
        version="1.0.0+local.1",
    )
    labels = JobLabels(
        keys=np.array([f"s{i}" for i in pick], dtype=str),
        x=rotated(data.x_train[pick], 25),
        y=data.y_train[pick].astype(np.int64),
        embeddings=np.zeros((300, 64), np.float32),
        embedded=np.zeros(300, bool),
    )
    write_job(job_dir, job, labels)
    for path in (finetune, jobs, job_dir, *job_dir.iterdir()):
        os.chown(path, *ids(root))
    request = finetune / "request"
    staged = finetune / "request.tmp"
    staged.write_bytes(Request(job=f"/{STATE}/finetune/jobs/rotated-300").to_json())
    os.chown(staged, *ids(root))
    staged.rename(request)  # the daemon writes it atomically too

    _until("the worker's result", (job_dir / "result.json").exists, 300)
    _until(
        "the unit to finish",
        lambda: booted.show("edged-finetune.service", "ActiveState")["ActiveState"] == "inactive",
        60,
    )
    result = json.loads((job_dir / "result.json").read_text())
    assert result["verdict"] == "accepted", result
    assert (job_dir / "candidate.edb").stat().st_size > 0
    unit = booted.show("edged-finetune.service", "Result", "ExecMainStatus", "User")
    assert unit == {"Result": "success", "ExecMainStatus": "0", "User": "edged"}, unit
    assert not request.exists()  # claimed (renamed to request.running) before the worker ran


def _running_after(booted: Booted, *, restarts: int) -> bool:
    shown = booted.show("edged", "ActiveState", "SubState", "NRestarts")
    return shown == {"ActiveState": "active", "SubState": "running", "NRestarts": str(restarts)}
