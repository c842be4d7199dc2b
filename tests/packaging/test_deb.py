"""The device packages as a user gets them: `packaging/build-deb` builds edged and
edged-finetune for this host, lintian passes them, and in a throwaway Debian root (made by
mmdebstrap, entered with chroot; never the host's own /) they install, serve a real model,
upgrade from the previous build with configuration, identity, outbox and model slots intact,
remove with the state kept and purge with it gone. No systemd runs there, as in an image
build. Needs root, debhelper, lintian and mmdebstrap (`make test` installs them as root)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from control_plane.toolchain.datasets import digits_dataset
from edged.engine import Engine, EngineOptions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VERSION = next(
    line.split('"')[1]
    for line in (REPO / "edged_formats" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__ = ")
)
PREVIOUS = f"{VERSION}~previous1"  # sorts before VERSION for dpkg
ROOTFS_PACKAGES = "python3,adduser,systemd,init-system-helpers,libstdc++6"
OS_RELEASE = dict(
    line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
)
SUITE = OS_RELEASE.get("VERSION_CODENAME", "").strip('"')
LINTIAN = ("lintian", "--fail-on", "error,warning")
TOOLS = ("dpkg-buildpackage", "dh", "lintian", "mmdebstrap", "chroot")


def _needs(condition: bool, reason: str) -> None:
    """Skip loudly on a developer machine; under CI a missing prerequisite is a failure."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run the package tests)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tools() -> None:
    _needs(os.geteuid() == 0, "the package tests need root (chroot, file ownership)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    _needs(not missing, f"missing {', '.join(missing)}: run `make deb-tools` as root")
    _needs(Path("/usr/bin/python3").exists(), "the build needs the distribution's /usr/bin/python3")
    debian = OS_RELEASE.get("ID") == "debian" and SUITE
    _needs(
        bool(debian), "the throwaway root is made with Debian's archive: this host is not Debian"
    )


def _run(*argv: str | Path, timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    process = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    assert process.returncode == 0, f"{argv}: {process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    return process


@pytest.fixture(scope="module")
def debs(tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """This tree built as VERSION (both packages) and, edged alone, as the lower PREVIOUS."""
    out = tmp_path_factory.mktemp("debs")
    arch = _run("dpkg", "--print-architecture").stdout.strip()
    build = REPO / "packaging" / "build-deb"
    _run(build, "--version", PREVIOUS, "--out", out, "--no-finetune", cwd=REPO)
    _run(build, "--version", VERSION, "--out", out, cwd=REPO)
    return {
        "edged-previous": out / f"edged_{PREVIOUS}_{arch}.deb",
        "edged-current": out / f"edged_{VERSION}_{arch}.deb",
        "edged-finetune-current": out / f"edged-finetune_{VERSION}_{arch}.deb",
    }


@pytest.fixture(scope="module")
def rootfs_tar(tools) -> Path:
    """A minimal Debian root of this host's release: the interpreter, adduser and systemd
    (installed, not running). Kept under build/ between local runs; a clean clone makes it again."""
    key = hashlib.sha256(f"{SUITE} {ROOTFS_PACKAGES}".encode()).hexdigest()[:12]
    tar = REPO / "build" / f"rootfs-{SUITE}-{key}.tar"
    if not tar.exists():
        tar.parent.mkdir(exist_ok=True)
        partial = tar.with_name(f"{tar.stem}.partial.tar")  # mmdebstrap goes by the suffix
        _run("mmdebstrap", "--variant=minbase", f"--include={ROOTFS_PACKAGES}", SUITE, partial)
        partial.rename(tar)
    return tar


@pytest.fixture
def root(rootfs_tar: Path, tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    with tarfile.open(rootfs_tar) as tar:
        tar.extractall(path, filter="fully_trusted")
    return path


def _chroot(root: Path, *argv: str | Path, user: str | None = None, **kw: object):
    spec = [f"--userspec={user}:{user}"] if user else []
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    return _run("chroot", *spec, root, *argv, env=env, **kw)


def _install(root: Path, deb: Path) -> str:
    shutil.copy(deb, root / "tmp" / deb.name)
    return _chroot(root, "dpkg", "-i", f"/tmp/{deb.name}").stdout


def _status(root: Path, package: str) -> str:
    return _chroot(root, "dpkg-query", "-W", "-f=${Status} ${Version}", package).stdout


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lintian_passes_both_packages(debs: dict[str, Path]) -> None:
    """No error or warning; what the project overrides carries its reason in the override
    file (packaging/debian/*.lintian-overrides)."""
    for name in ("edged-current", "edged-finetune-current"):
        process = subprocess.run(
            [*LINTIAN, str(debs[name])],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        findings = [line for line in process.stdout.splitlines() if line[:2] in ("E:", "W:")]
        assert process.returncode == 0 and not findings, (name, findings, process.stderr[-2000:])


def test_the_packages_hold_what_the_layout_promises(debs: dict[str, Path]) -> None:
    edged = _run("dpkg-deb", "--contents", debs["edged-current"]).stdout
    for path in (
        "./opt/edged/bin/python3 -> ",
        "./usr/bin/edged -> /opt/edged/bin/edged",
        "./etc/edged/edged.toml",
        "./lib/systemd/system/edged.service",
        "./lib/systemd/system/edged-firmware-bridge.service",
        "./usr/share/man/man1/edged.1.gz",
    ):
        assert path in edged, path
    assert "/torch/" not in edged and "edged-control-plane.service" not in edged
    assert "/__pycache__/" not in edged  # postinst compiles on the device
    finetune = _run("dpkg-deb", "--contents", debs["edged-finetune-current"]).stdout
    assert "./opt/edged/finetune/torch/__init__.py" in finetune
    assert "./lib/systemd/system/edged-finetune.path" in finetune
    depends = _run("dpkg-deb", "--field", debs["edged-current"], "Depends").stdout
    assert "python3.11" in depends and "adduser" in depends


STATE_SCRIPT = """
import asyncio, sys
from pathlib import Path
from edged.identity import DeviceIdentity
from edged.outbox import Outbox, OutboxConfig

state = Path("/var/lib/edged")
print(DeviceIdentity.load_or_create(state / "device.key").public_key_hex)

async def outbox(put):
    async with Outbox(OutboxConfig(path=state / "outbox.db")) as box:
        if put:
            await box.put("event", {"kind": "packaged", "n": 1})
        print(len(await box.lease(100, 1 << 20)))

asyncio.run(outbox(sys.argv[1] == "put"))
"""


def test_install_upgrade_remove_purge_in_a_throwaway_root(
    debs: dict[str, Path], root: Path, digits_build
) -> None:
    assert not (root / "run" / "systemd" / "system").exists()  # systemd installed, not running

    _install_first(root, debs["edged-previous"])
    state = root / "var" / "lib" / "edged"

    # The installed tree serves a real model: same top-1 as this checkout's engine.
    out, report = digits_build
    bundle = out / report.bundle
    shutil.copy(bundle, root / "tmp" / "model.edb")
    x = digits_dataset().x_test[:32]
    np.savez(root / "tmp" / "x.npz", x=x)
    printed = _chroot(root, "edged", "predict", "/tmp/model.edb", "/tmp/x.npz", "--top", "1").stdout
    engine = Engine.from_file(bundle, EngineOptions())
    expected = [engine.labels[i] for i in engine.predict(x).top1]
    assert [json.loads(line)["label"] for line in printed.splitlines()] == expected

    # State the daemon makes, as its own user: identity, an outbox record, a model slot; and an
    # operator's change to the conffile.
    (root / "tmp" / "state.py").write_text(STATE_SCRIPT)
    made = _chroot(root, "/opt/edged/bin/python3", "/tmp/state.py", "put", user="edged").stdout
    key, leased = made.split()
    assert leased == "1"
    slots = state / "models"
    slots.mkdir()
    shutil.copy(bundle, slots / "a.edb")
    os.chown(slots, *_ids(root))
    config = root / "etc" / "edged" / "edged.toml"
    config.write_text(config.read_text() + '\n[device]\nstate_dir = "/var/lib/edged"\n')
    kept = {p: _digest(p) for p in (config, state / "device.key", slots / "a.edb")}

    # Postinst is idempotent: configured again, nothing changes and nothing fails.
    _chroot(root, "/var/lib/dpkg/info/edged.postinst", "configure", PREVIOUS)
    assert {p: _digest(p) for p in kept} == kept

    # Upgrade: everything survives, the record is still there to send.
    _install(root, debs["edged-current"])
    assert _status(root, "edged") == f"install ok installed {VERSION}"
    assert {p: _digest(p) for p in kept} == kept
    again = _chroot(root, "/opt/edged/bin/python3", "/tmp/state.py", "read", user="edged").stdout
    assert again.split() == [key, "1"]

    # The fine-tuning package puts torch on the same interpreter's path and enables its
    # path unit (no systemd running: the link is made, nothing is started).
    _install(root, debs["edged-finetune-current"])
    probe = "import torch, psutil, edged.finetune.service; print(torch.__version__)"
    assert _chroot(root, "/opt/edged/bin/python3", "-c", probe).stdout.startswith("2.13.0")
    wants = root / "etc" / "systemd" / "system" / "paths.target.wants" / "edged-finetune.path"
    assert wants.is_symlink()
    assert not (
        root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "edged.service"
    ).exists()

    # Remove: the application goes, configuration and state stay.
    _chroot(root, "dpkg", "--remove", "edged-finetune", "edged")
    assert not (root / "opt" / "edged").exists()
    assert not (root / "usr" / "bin" / "edged").exists()
    assert _status(root, "edged").startswith("deinstall ok config-files")
    assert {p: _digest(p) for p in kept} == kept
    assert not wants.exists()

    # Purge: state and configuration gone.
    _chroot(root, "dpkg", "--purge", "edged-finetune", "edged")
    assert not state.exists()
    assert not (root / "etc" / "edged").exists()


def _ids(root: Path) -> tuple[int, int]:
    ids = _chroot(root, "id", "-u", "edged").stdout, _chroot(root, "id", "-g", "edged").stdout
    return int(ids[0]), int(ids[1])


def _install_first(root: Path, deb: Path) -> None:
    """Install the previous build: user, state directory, conffile, a working interpreter."""
    _install(root, deb)
    assert _status(root, "edged") == f"install ok installed {PREVIOUS}"
    passwd = (root / "etc" / "passwd").read_text()
    assert any(line.startswith("edged:") for line in passwd.splitlines())
    state = root / "var" / "lib" / "edged"
    assert oct(state.stat().st_mode & 0o777) == "0o750"
    assert _chroot(root, "stat", "-c", "%U:%G", "/var/lib/edged").stdout.strip() == "edged:edged"
    conffiles = (root / "var" / "lib" / "dpkg" / "info" / "edged.conffiles").read_text().split()
    assert conffiles == ["/etc/edged/edged.toml"]
    _chroot(root, "edged", "check-config", "/etc/edged/edged.toml")
    assert list((root / "opt" / "edged" / "lib").rglob("__pycache__"))  # postinst compiled
