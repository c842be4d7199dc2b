"""How the API shows a device's presence: the last will and silence both mean offline."""

from __future__ import annotations

import time

from control_plane.api.devices import public
from control_plane.db.models import Device


def _device(online: bool, last_seen: float | None) -> Device:
    return Device(
        id="dev-1",
        public_key="00" * 32,
        group="g",
        tags=[],
        status="active",
        api_token_hash="x",
        enrolled_at=0.0,
        enrollment_id="e",
        online=online,
        last_seen=last_seen,
    )


def test_online_needs_presence_and_recent_traffic() -> None:
    """Online only while presence says so and the device was heard within the timeout."""
    now = time.time()
    assert public(_device(True, now - 10), 300).online
    assert not public(_device(True, now - 301), 300).online  # silent: no last will came
    assert not public(_device(False, now), 300).online  # its last will arrived
    assert not public(_device(True, None), 300).online
