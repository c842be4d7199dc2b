"""The device packages as a user gets them: `packaging/build-deb` builds edged and
edged-finetune for this host, lintian passes them, and in a throwaway Debian root (made by
mmdebstrap, entered with chroot; never the host's own /) they install, serve a real model,
upgrade from the previous build with configuration, identity, outbox and model slots intact,
remove with the state kept and purge with it gone. No systemd runs there, as in an image
build. Needs root, debhelper, lintian and mmdebstrap (`make test` installs them as root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from control_plane.toolchain.datasets import digits_dataset
from edged.engine import Engine, EngineOptions
from tests.packaging.debroot import (
    AHEAD,
    PREVIOUS,
    VERSION,
    chroot,
    digest,
    ids,
    install,
    run,
    status,
)

pytestmark = pytest.mark.slow

LINTIAN = ("lintian", "--fail-on", "error,warning")


def test_lintian_passes_both_packages(debs: dict[str, Path]) -> None:
    """No error or warning; what the project overrides carries its reason in the override
    file (packaging/debian/*.lintian-overrides)."""
    for name in ("edged-current", "edged-finetune-current"):
        process = subprocess.run(
            [*AHEAD, *LINTIAN, str(debs[name])],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        findings = [line for line in process.stdout.splitlines() if line[:2] in ("E:", "W:")]
        assert process.returncode == 0 and not findings, (name, findings, process.stderr[-2000:])


def test_the_packages_hold_what_the_layout_promises(debs: dict[str, Path]) -> None:
    edged = run("dpkg-deb", "--contents", debs["edged-current"]).stdout
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
    finetune = run("dpkg-deb", "--contents", debs["edged-finetune-current"]).stdout
    assert "./opt/edged/finetune/torch/__init__.py" in finetune
    assert "./lib/systemd/system/edged-finetune.path" in finetune
    depends = run("dpkg-deb", "--field", debs["edged-current"], "Depends").stdout
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
    printed = chroot(root, "edged", "predict", "/tmp/model.edb", "/tmp/x.npz", "--top", "1").stdout
    engine = Engine.from_file(bundle, EngineOptions())
    expected = [engine.labels[i] for i in engine.predict(x).top1]
    assert [json.loads(line)["label"] for line in printed.splitlines()] == expected

    # State the daemon makes, as its own user: identity, an outbox record, a model slot; and an
    # operator's change to the conffile.
    (root / "tmp" / "state.py").write_text(STATE_SCRIPT)
    made = chroot(root, "/opt/edged/bin/python3", "/tmp/state.py", "put", user="edged").stdout
    key, leased = made.split()
    assert leased == "1"
    slots = state / "models"
    slots.mkdir()
    shutil.copy(bundle, slots / "a.edb")
    os.chown(slots, *ids(root))
    config = root / "etc" / "edged" / "edged.toml"
    config.write_text(config.read_text() + '\n[device]\nstate_dir = "/var/lib/edged"\n')
    kept = {p: digest(p) for p in (config, state / "device.key", slots / "a.edb")}

    # Postinst is idempotent: configured again, nothing changes and nothing fails.
    chroot(root, "/var/lib/dpkg/info/edged.postinst", "configure", PREVIOUS)
    assert {p: digest(p) for p in kept} == kept

    # Upgrade: everything survives, the record is still there to send.
    install(root, debs["edged-current"])
    assert status(root, "edged") == f"install ok installed {VERSION}"
    assert {p: digest(p) for p in kept} == kept
    again = chroot(root, "/opt/edged/bin/python3", "/tmp/state.py", "read", user="edged").stdout
    assert again.split() == [key, "1"]

    # The fine-tuning package puts torch on the same interpreter's path and enables its
    # path unit (no systemd running: the link is made, nothing is started).
    install(root, debs["edged-finetune-current"])
    probe = "import torch, psutil, edged.finetune.service; print(torch.__version__)"
    assert chroot(root, "/opt/edged/bin/python3", "-c", probe).stdout.startswith("2.13.0")
    wants = root / "etc" / "systemd" / "system" / "paths.target.wants" / "edged-finetune.path"
    assert wants.is_symlink()
    assert not (
        root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "edged.service"
    ).exists()

    # Remove: the application goes, configuration and state stay.
    chroot(root, "dpkg", "--remove", "edged-finetune", "edged")
    assert not (root / "opt" / "edged").exists()
    assert not (root / "usr" / "bin" / "edged").exists()
    assert status(root, "edged").startswith("deinstall ok config-files")
    assert {p: digest(p) for p in kept} == kept
    assert not wants.exists()

    # Purge: state and configuration gone.
    chroot(root, "dpkg", "--purge", "edged-finetune", "edged")
    assert not state.exists()
    assert not (root / "etc" / "edged").exists()


def _install_first(root: Path, deb: Path) -> None:
    """Install the previous build: user, state directory, conffile, a working interpreter."""
    install(root, deb)
    assert status(root, "edged") == f"install ok installed {PREVIOUS}"
    passwd = (root / "etc" / "passwd").read_text()
    assert any(line.startswith("edged:") for line in passwd.splitlines())
    state = root / "var" / "lib" / "edged"
    assert oct(state.stat().st_mode & 0o777) == "0o750"
    assert chroot(root, "stat", "-c", "%U:%G", "/var/lib/edged").stdout.strip() == "edged:edged"
    conffiles = (root / "var" / "lib" / "dpkg" / "info" / "edged.conffiles").read_text().split()
    assert conffiles == ["/etc/edged/edged.toml"]
    chroot(root, "edged", "check-config", "/etc/edged/edged.toml")
    assert list((root / "opt" / "edged" / "lib").rglob("__pycache__"))  # postinst compiled
