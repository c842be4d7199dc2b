"""`edged enroll` run as root on a packaged device hands what it wrote to the state
directory's owner, the daemon's user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.daemon_cli import _hand_to_state_owner

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_files_written_as_root_go_to_the_state_owner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "ota" / "metadata").mkdir(parents=True)
    for name in ("device.key", "enrollment.json", "uplink.password", "api.token"):
        (state / name).write_text("x")
    (state / "ota" / "metadata" / "root.json").write_text("{}")
    (state / "unrelated").write_text("left alone")
    os.chown(state, NOBODY, NOBODY)
    _hand_to_state_owner(state)
    for name in ("device.key", "enrollment.json", "uplink.password", "api.token", "ota"):
        assert (state / name).stat().st_uid == NOBODY, name
    assert (state / "ota" / "metadata" / "root.json").stat().st_gid == NOBODY
    assert (state / "unrelated").stat().st_uid == 0


def test_a_root_owned_state_directory_is_left_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "device.key").write_text("x")
    before = (tmp_path / "device.key").stat().st_uid
    _hand_to_state_owner(tmp_path)
    assert (tmp_path / "device.key").stat().st_uid == before
