"""What the package tests share: the versions built, the throwaway root's make-up, and running
commands on the host or inside a root (tests/packaging/conftest.py holds the fixtures)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = next(
    line.split('"')[1]
    for line in (REPO / "edged_formats" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__ = ")
)
PREVIOUS = f"{VERSION}~previous1"  # sorts before VERSION for dpkg
ROOTFS_PACKAGES = "python3,adduser,procps,systemd,init-system-helpers,libstdc++6"
OS_RELEASE = dict(
    line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
)
SUITE = OS_RELEASE.get("VERSION_CODENAME", "").strip('"')
TOOLS = ("dpkg-buildpackage", "dh", "lintian", "mmdebstrap", "chroot")


def needs(condition: bool, reason: str) -> None:
    """Skip loudly on a developer machine; under CI a missing prerequisite is a failure."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run the package tests)")
        pytest.skip(reason)


def run(*argv: str | Path, timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    process = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    assert process.returncode == 0, f"{argv}: {process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    return process


# The package chain (build, lintian) is the suite's longest work unit under pytest-xdist; as
# root (which these tests need) it runs ahead of the other workers' load.
AHEAD = ("nice", "-n", "-10")


def chroot(root: Path, *argv: str | Path, user: str | None = None, **kw: object):
    spec = [f"--userspec={user}:{user}"] if user else []
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    return run("chroot", *spec, root, *argv, env=env, **kw)


def install(root: Path, *debs: Path) -> str:
    for deb in debs:
        shutil.copy(deb, root / "tmp" / deb.name)
    return chroot(root, "dpkg", "-i", *(f"/tmp/{deb.name}" for deb in debs)).stdout


def status(root: Path, package: str) -> str:
    return chroot(root, "dpkg-query", "-W", "-f=${Status} ${Version}", package).stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ids(root: Path, user: str = "edged") -> tuple[int, int]:
    uid, gid = chroot(root, "id", "-u", user).stdout, chroot(root, "id", "-g", user).stdout
    return int(uid), int(gid)
