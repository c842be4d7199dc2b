"""`make demo`, act 7: what a device installs (docs/packaging.md, docs/systemd.md).

Every unit in systemd/ rated by the real `systemd-analyze security --offline=true`; then, where
the package tools are here (Debian, root: `make deb-tools`), the edged .deb built from this tree
by `packaging/build-deb`, its control fields and lintian's verdict. Where a tool is missing the
act says so and what installs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)")
DEB_TOOLS = ("dpkg-buildpackage", "dh", "lintian")


def _units() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("  skipped: systemd-analyze is not installed (apt install systemd)")
        return
    for unit in sorted((REPO / "systemd").glob("*.service")):
        result = subprocess.run(
            [analyze, "security", "--offline=true", str(unit)],
            capture_output=True,
            text=True,
            check=False,
        )
        match = EXPOSURE.search(result.stdout)
        verdict = f"{match[1]} {match[2]}" if match else f"no rating ({result.stderr.strip()})"
        print(f"  {unit.name:34} exposure {verdict}")


def _package(out: Path) -> None:
    missing = [tool for tool in DEB_TOOLS if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        why = f"missing {', '.join(missing)}" if missing else "not root"
        print(f"  skipped the .deb: {why} (run `make deb-tools` as root, then `make deb`)")
        return
    print("  packaging/build-deb --no-finetune (edged alone; `make deb` adds edged-finetune)")
    build = subprocess.run(
        [str(REPO / "packaging" / "build-deb"), "--no-finetune", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if build.returncode != 0:
        raise SystemExit(f"demo step failed: build-deb\n{build.stderr[-2000:]}")
    deb = Path(build.stdout.split()[-1])
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Package", "Version", "Architecture", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(f"  {deb.name}: {deb.stat().st_size / 1e6:.1f} MB")
    for line in fields.splitlines():
        print(f"    {line}")
    lint = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:")]
    print(f"  lintian: {'clean' if not findings else f'{len(findings)} findings'}")
    for line in findings[:5]:
        print(f"    {line}")


def ship_act(out: Path) -> None:
    print("\n== shipping: the hardened units, rated by systemd-analyze", flush=True)
    _units()
    print("\n== shipping: the device package", flush=True)
    _package(out / "deb")
    print(
        "  on a device: apt install ./edged_<version>_<arch>.deb; "
        "edged enroll --url URL --token T; systemctl enable --now edged"
    )
