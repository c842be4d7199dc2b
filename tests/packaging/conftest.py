"""Fixtures of the package tests: the packages built once per session from this tree, and
throwaway Debian roots (mmdebstrap; never the host's own /)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.packaging.debroot import (
    AHEAD,
    OS_RELEASE,
    PREVIOUS,
    REPO,
    ROOTFS_PACKAGES,
    SUITE,
    TOOLS,
    VERSION,
    needs,
    run,
)


@pytest.fixture(scope="session")
def tools() -> None:
    needs(os.geteuid() == 0, "the package tests need root (chroot, file ownership)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    needs(not missing, f"missing {', '.join(missing)}: run `make deb-tools` as root")
    needs(Path("/usr/bin/python3").exists(), "the build needs the distribution's /usr/bin/python3")
    debian = OS_RELEASE.get("ID") == "debian" and SUITE
    needs(bool(debian), "the throwaway root is made with Debian's archive: this host is not Debian")


@pytest.fixture(scope="session")
def debs(tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """This tree built as VERSION (both packages), and the edged package again as the lower
    PREVIOUS: the same files and maintainer scripts under the older version, which is what an
    upgrade test needs (a second build would take a minute more for the same content)."""
    out = tmp_path_factory.mktemp("debs")
    arch = run("dpkg", "--print-architecture").stdout.strip()
    run(*AHEAD, REPO / "packaging" / "build-deb", "--version", VERSION, "--out", out, cwd=REPO)
    current = out / f"edged_{VERSION}_{arch}.deb"
    previous = out / f"edged_{PREVIOUS}_{arch}.deb"
    tree = out / "previous"
    run("dpkg-deb", "--raw-extract", current, tree)
    control = tree / "DEBIAN" / "control"
    lines = control.read_text().splitlines()
    assert f"Version: {VERSION}" in lines, lines
    control.write_text(
        "".join(
            f"Version: {PREVIOUS}\n" if line.startswith("Version: ") else f"{line}\n"
            for line in lines
        )
    )
    run(*AHEAD, "dpkg-deb", "-Zxz", "-z1", "--build", tree, previous)
    shutil.rmtree(tree)
    return {
        "edged-previous": previous,
        "edged-current": current,
        "edged-finetune-current": out / f"edged-finetune_{VERSION}_{arch}.deb",
    }


@pytest.fixture(scope="session")
def rootfs_tar(tools) -> Path:
    """A minimal Debian root of this host's release: the interpreter, adduser and systemd
    (installed, not running). Kept under build/ between local runs; a clean clone makes it again."""
    key = hashlib.sha256(f"{SUITE} {ROOTFS_PACKAGES}".encode()).hexdigest()[:12]
    tar = REPO / "build" / f"rootfs-{SUITE}-{key}.tar"
    if not tar.exists():
        tar.parent.mkdir(exist_ok=True)
        partial = tar.with_name(f"{tar.stem}.partial.tar")  # mmdebstrap goes by the suffix
        run("mmdebstrap", "--variant=minbase", f"--include={ROOTFS_PACKAGES}", SUITE, partial)
        partial.rename(tar)
    return tar


@pytest.fixture
def root(rootfs_tar: Path, tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    with tarfile.open(rootfs_tar) as tar:
        tar.extractall(path, filter="fully_trusted")
    return path
