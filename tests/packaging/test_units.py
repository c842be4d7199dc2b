"""Every unit in systemd/ as systemd 252 judges it, and the hardening facts that matter.

- `systemd-analyze security --offline=true` rates every service's exposure at most 2.0.
- `systemd-analyze verify` is clean (no output at all) on a throwaway root holding a copy of
  the host's own units, ours, and executable stand-ins only at the paths our packages
  install (PACKAGED); any other command a unit names must exist on the host.
- The seccomp part of the sandbox (SystemCallFilter=, SystemCallErrorNumber=,
  MemoryDenyWriteExecute=) is rebuilt from the unit with libseccomp, the way systemd 252
  builds it, around a real daemon inferring on a real model: no running systemd needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.support.daemon as daemon_support
from tests.support.daemon import DaemonProcess, render_toml

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted(
    p for s in ("service", "path", "slice", "timer") for p in ROOT.glob(f"systemd/*.{s}")
)
SERVICES = [p for p in UNITS if p.suffix == ".service"]
MAX_EXPOSURE = 2.0
# What the packages put on the target (docs/systemd.md): the device .deb's venv and its entry
# point, and the control plane's venv (control-plane hosts).
PACKAGED = {
    "/usr/bin/edged",
    "/opt/edged/bin/python",
    "/opt/edged/bin/edged",
    "/opt/edged-control-plane/bin/edged-control-plane",
}
# Where the project keeps state: the only places a unit may make writable.
STATE_TREES = ("/var/lib/edged", "/run/edged", "/var/lib/edged-control-plane")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (systemd 252 on Debian 12 has it)"
)
Unit = dict[str, dict[str, list[str]]]


def read_unit(path: Path) -> Unit:
    """Sections -> key -> every value in file order (units repeat keys; '' resets a list)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str | None:
    """The effective value of a single-valued key (the last assignment wins)."""
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def words(unit: Unit, key: str) -> list[str]:
    """A list-valued [Service] key as systemd accumulates it."""
    out: list[str] = []
    for value in unit.get("Service", {}).get(key, []):
        out = [] if not value else [*out, *value.split()]
    return out


def test_every_kind_of_unit_is_covered() -> None:
    """The glob finds the units this issue ships (the finetune ones join by themselves)."""
    names = {p.name for p in UNITS}
    assert {
        "edged.service",
        "edged-firmware-bridge.service",
        "edged-control-plane.service",
    } <= names


# -- systemd-analyze security ---------------------------------------------------------------


def exposure(service: Path) -> float:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(
        rf"Overall exposure level for {re.escape(service.name)}: (\d+\.\d)", result.stdout
    )
    assert match, f"no exposure figure for {service.name}:\n{result.stdout}{result.stderr}"
    return float(match[1])


@needs_analyze
@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
def test_exposure_at_most_two(service: Path) -> None:
    """`systemd-analyze security --offline=true` rates the service 2.0 or better."""
    figure = exposure(service)
    print(f"{service.name}: exposure {figure}")
    assert figure <= MAX_EXPOSURE


# -- systemd-analyze verify on a throwaway root ---------------------------------------------


def commands(unit: Unit) -> Iterator[str]:
    """The executable of every Exec*= line (prefixes such as '-' and '+' stripped)."""
    for key, values in unit.get("Service", {}).items():
        if key.startswith("Exec"):
            for value in values:
                if value:
                    yield value.split()[0].lstrip("-@:+!")


def verify(units: dict[str, str]) -> tuple[int, str]:
    """`systemd-analyze verify` of `units` (name -> text) installed in /lib/systemd/system of a
    throwaway root: the host's own units beside them, a stand-in at each PACKAGED path a unit
    runs, and a stand-in at any other path only where the host has that program itself."""
    assert ANALYZE is not None
    with tempfile.TemporaryDirectory(prefix="edged-units-") as tmp:
        root = Path(tmp)
        system = root / "usr/lib/systemd/system"
        shutil.copytree("/usr/lib/systemd/system", system, symlinks=True)
        for merged in ("bin", "sbin", "lib"):  # the usr-merged layout Debian 12 has
            (root / merged).symlink_to(f"usr/{merged}")
        for name, text in units.items():
            (system / name).write_text(text)
            for command in commands(read_unit(system / name)):
                target = Path(os.path.realpath(command))
                if command in PACKAGED or os.access(target, os.X_OK):
                    stand_in = root / target.relative_to("/")
                    stand_in.parent.mkdir(parents=True, exist_ok=True)
                    stand_in.write_text("#!/bin/sh\nexit 0\n")
                    stand_in.chmod(0o755)
        result = subprocess.run(
            [ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no", *units],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    return result.returncode, (result.stdout + result.stderr).strip()


@needs_analyze
def test_verify_is_clean() -> None:
    """`systemd-analyze verify` accepts every unit without a single warning."""
    code, output = verify({p.name: p.read_text() for p in UNITS})
    assert (code, output) == (0, "")


@needs_analyze
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("ProtectClock=yes", "ProtectClok=yes"), "Unknown key"),
        (("Restart=on-failure", "Restart=sometimes"), "restart specifier"),
        (("ExecStart=/usr/bin/edged", "ExecStart=/usr/bin/edgd"), "not executable"),
    ],
    ids=["misspelt-key", "bad-value", "missing-program"],
)
def test_verify_catches_a_broken_unit(change: tuple[str, str], expected: str) -> None:
    """The method fails on real mistakes, even those verify only warns about (exit 0)."""
    text = (ROOT / "systemd/edged.service").read_text()
    assert change[0] in text
    code, output = verify({"edged.service": text.replace(change[0], change[1], 1)})
    assert output and expected in output, (code, output)


# -- the facts behind the figures -----------------------------------------------------------


def test_daemon_unit_is_a_watched_notify_service_of_its_own_user() -> None:
    """edged.service: Type=notify, a watchdog, restarts on failure within a start limit, as
    user and group edged, with /var/lib/edged as its state directory."""
    unit = read_unit(ROOT / "systemd/edged.service")
    assert one(unit, "Service", "Type") == "notify"
    assert int(one(unit, "Service", "WatchdogSec") or 0) > 0
    assert one(unit, "Service", "Restart") == "on-failure"
    assert int(one(unit, "Unit", "StartLimitBurst") or 0) > 0
    assert int(one(unit, "Unit", "StartLimitIntervalSec") or 0) > 0
    assert (one(unit, "Service", "User"), one(unit, "Service", "Group")) == ("edged", "edged")
    assert words(unit, "StateDirectory") == ["edged"]


@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
def test_only_the_state_trees_are_writable(service: Path) -> None:
    """ProtectSystem=strict: a service writes its StateDirectory/RuntimeDirectory and, through
    ReadWritePaths= or BindPaths=, nothing outside the project's state trees."""
    unit = read_unit(service)
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectHome") == "yes"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    writable = [f"/var/lib/{d}" for d in words(unit, "StateDirectory")]
    writable += [f"/run/{d}" for d in words(unit, "RuntimeDirectory")]
    for value in words(unit, "ReadWritePaths") + words(unit, "BindPaths"):
        writable += value.lstrip("-+").split(":")[:2]  # BindPaths=SRC:DEST: both count
    assert all(any(Path(p).is_relative_to(t) for t in STATE_TREES) for p in writable), writable
    assert one(unit, "Service", "User") not in (None, "root")
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert unit["Service"].get("CapabilityBoundingSet") == [""]


def test_daemon_reaches_the_network_and_no_device() -> None:
    """edged.service talks MQTT and HTTPS (IPv4, IPv6, unix sockets) and sees no device."""
    unit = read_unit(ROOT / "systemd/edged.service")
    assert sorted(words(unit, "RestrictAddressFamilies")) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one(unit, "Service", "PrivateDevices") == "yes"
    assert "IPAddressDeny" not in unit["Service"]


def test_bridge_reaches_serial_devices_and_the_local_broker_only() -> None:
    """edged-firmware-bridge.service: a closed device policy opened for serial ttys alone
    (through group dialout), IP to localhost only, and is not enabled by the package."""
    unit = read_unit(ROOT / "systemd/edged-firmware-bridge.service")
    assert one(unit, "Service", "DevicePolicy") == "closed"
    allowed = unit["Service"]["DeviceAllow"]
    assert sorted(allowed) == sorted(
        f"char-{tty} rw" for tty in ("ttyUSB", "ttyACM", "ttyAMA", "ttyS")
    )
    assert words(unit, "SupplementaryGroups") == ["dialout"]
    assert words(unit, "IPAddressDeny") == ["any"]
    assert words(unit, "IPAddressAllow") == ["localhost"]
    assert one(unit, "Service", "ExecStart") == "/opt/edged/bin/python -m firmware_bridge"


@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
def test_a_refused_system_call_fails_instead_of_killing(service: Path) -> None:
    """A service that filters system calls answers refused ones with EPERM: numpy's OpenBLAS
    calls mbind() (in @resources) as it loads, and the default action would kill the process."""
    unit = read_unit(service)
    if unit["Service"].get("SystemCallFilter"):
        assert one(unit, "Service", "SystemCallErrorNumber") == "EPERM"


def test_unit_commands_are_real() -> None:
    """The daemon's and the control plane's Exec lines name commands their CLIs have: the
    shipped configuration passes `check-config`, `run --config` parses, `migrate` and `serve`
    exist."""
    daemon = read_unit(ROOT / "systemd/edged.service")["Service"]
    cp = read_unit(ROOT / "systemd/edged-control-plane.service")["Service"]
    assert daemon["ExecStartPre"] == ["/usr/bin/edged check-config /etc/edged/edged.toml"]
    assert daemon["ExecStart"] == ["/usr/bin/edged run --config /etc/edged/edged.toml"]
    prefix = "/opt/edged-control-plane/bin/edged-control-plane"
    assert (cp["ExecStartPre"], cp["ExecStart"]) == ([f"{prefix} migrate"], [f"{prefix} serve"])

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, check=False
        )

    assert run("edged.cli", "check-config", str(ROOT / "packaging/edged.toml")).returncode == 0
    parsed = run("edged.cli", "run", "--config", "/nonexistent/edged.toml")
    assert "cannot read /nonexistent/edged.toml" in parsed.stderr and "usage:" not in parsed.stderr
    for command in ("migrate", "serve"):
        assert run("control_plane.cli", command, "--help").returncode == 0


# -- the seccomp filters, rebuilt from the unit around real processes -----------------------

_ALLOW, _KILL_PROCESS, _MASKED_EQ = 0x7FFF0000, 0x80000000, 7
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and its members (calls and @groups)."""
    assert ANALYZE is not None
    listing = subprocess.run(
        [ANALYZE, "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def confinement(service: Path) -> dict[str, object]:
    """What systemd 252 loads for the unit's SystemCallFilter=, SystemCallErrorNumber= and
    MemoryDenyWriteExecute=, as a JSON-able spec for `exec_confined`."""
    groups, unit = syscall_groups(), read_unit(service)

    def expand(name: str) -> set[str]:
        name = name.partition(":")[0]
        return set().union(*map(expand, groups[name])) if name.startswith("@") else {name}

    allowed: set[str] = set()
    for value in unit["Service"]["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*map(expand, value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    error = one(unit, "Service", "SystemCallErrorNumber")
    return {
        "allow": sorted(allowed),
        "errno": getattr(errno, error) if error else None,
        "mdwe": one(unit, "Service", "MemoryDenyWriteExecute") == "yes",
    }


def exec_confined(argv: list[str]) -> None:
    """In a child: `argv` is [spec JSON, program, args...]; load the filters and exec."""
    spec = json.loads(argv[0])
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_exact_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]

    def rule(ctx: int, action: int, name: str, *cmp: _ArgCmp) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # unknown to this libseccomp: systemd skips it as well
            lib.seccomp_rule_add_exact_array(ctx, action, number, len(cmp), (_ArgCmp * 1)(*cmp))

    eperm = 0x00050000 | errno.EPERM
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
    if spec["mdwe"]:  # systemd 252's seccomp_memory_deny_write_execute(), loaded first
        ctx = lib.seccomp_init(_ALLOW)
        both = _ArgCmp(2, _MASKED_EQ, _PROT_WRITE | _PROT_EXEC, _PROT_WRITE | _PROT_EXEC)
        rule(ctx, eperm, "mmap", both)
        rule(ctx, eperm, "mprotect", _ArgCmp(2, _MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        rule(ctx, eperm, "pkey_mprotect", _ArgCmp(2, _MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        rule(ctx, eperm, "shmat", _ArgCmp(2, _MASKED_EQ, _SHM_EXEC, _SHM_EXEC))
        assert lib.seccomp_load(ctx) == 0
    ctx = lib.seccomp_init(_KILL_PROCESS if spec["errno"] is None else 0x00050000 | spec["errno"])
    for name in spec["allow"]:
        rule(ctx, _ALLOW, name)
    assert lib.seccomp_load(ctx) == 0
    os.execv(argv[1], argv[1:])


needs_seccomp = pytest.mark.skipif(
    ANALYZE is None or ctypes.util.find_library("seccomp") is None,
    reason="needs systemd-analyze and libseccomp (libseccomp2, a dependency of systemd)",
)


def confined(service: Path, **override: object) -> list[str]:
    """A command prefix that runs a program under the service's seccomp filters."""
    spec = {**confinement(service), **override}
    launcher = (
        "import sys; from tests.packaging.test_units import exec_confined as e; e(sys.argv[1:])"
    )
    return [sys.executable, "-c", launcher, json.dumps(spec)]


def run_confined(prefix: list[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@needs_seccomp
def test_the_rebuilt_filters_bite() -> None:
    """Under edged.service's filters a refused call fails with EPERM (os.nice is @resources),
    with systemd's default action it kills (SIGSYS), and W+X memory is refused."""
    service = ROOT / "systemd/edged.service"
    nice = run_confined(
        confined(service), "import os\ntry: os.nice(1)\nexcept PermissionError: print('EPERM')"
    )
    assert nice.stdout.strip() == "EPERM", nice.stderr
    killed = run_confined(confined(service, errno=None), "import os; os.nice(1)")
    assert killed.returncode == -signal.SIGSYS
    wx = "import mmap\ntry: mmap.mmap(-1, 4096, prot=7)\nexcept PermissionError: print('refused')"
    assert run_confined(confined(service), wx).stdout.strip() == "refused"


@needs_seccomp
def test_daemon_infers_under_its_units_filters(
    tmp_path, tf_bundles, tf_reference, monkeypatch
) -> None:
    """A real `edged run` under edged.service's syscall filter and MemoryDenyWriteExecute:
    LiteRT (XNNPACK, two threads), numpy and SQLite load, every sample is inferred, the
    watchdog pings and SIGTERM exits 0."""
    monkeypatch.setattr(
        daemon_support,
        "EDGED",
        [*confined(ROOT / "systemd/edged.service"), sys.executable, "-m", "edged.cli"],
    )
    stream = tmp_path / "stream.npz"
    import numpy as np

    np.savez(stream, x=tf_reference["x"])
    short = Path(tempfile.mkdtemp(prefix="edged-"))  # unix socket paths: 107 bytes at most
    body = {
        "device": {"state_dir": str(tmp_path / "state"), "model": str(tf_bundles["digits_float"])},
        "engine": {"threads": 2},
        "source": [{"kind": "replay", "name": "digits", "path": str(stream), "rate_hz": 200}],
        "uplink": {"enabled": False},
        "update": {"enabled": False},
        "outbox": {"min_free_mb": 0},
        "status": {"socket": str(short / "status.sock")},
    }
    config = tmp_path / "edged.toml"
    config.write_text(render_toml(body))
    try:
        env = {"PYTHONPATH": str(ROOT)}
        with DaemonProcess(config, tmp_path, watchdog_s=1.0, env=env) as daemon:
            daemon.wait_ready()
            assert daemon.process is not None
            status = Path(f"/proc/{daemon.process.pid}/status").read_text()
            assert re.search(r"^Seccomp:\s+2$", status, re.M), "no seccomp filter"
            total = len(tf_reference["x"])
            daemon.wait_for(lambda: daemon.status()["counts"]["inferred"] == total, 30, "inference")
            daemon.wait_for(lambda: len(daemon.notified("WATCHDOG=1")) >= 2, 10, "watchdog")
            assert daemon.terminate() == 0, daemon.log()
    finally:
        shutil.rmtree(short, ignore_errors=True)


@needs_seccomp
def test_control_plane_migrates_under_its_units_filters(tmp_path) -> None:
    """`edged-control-plane migrate` (SQLAlchemy, Alembic, aiosqlite) runs under
    edged-control-plane.service's syscall filter and MemoryDenyWriteExecute."""
    prefix = confined(ROOT / "systemd/edged-control-plane.service")
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "control_plane.cli", "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "EDGED_CP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/cp.db"},
        check=False,
    )
    assert result.returncode == 0 and "at migration" in result.stdout, result.stderr
