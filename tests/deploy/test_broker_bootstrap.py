"""deploy/mosquitto/mosquitto.conf and deploy/dynsec_init.py on a real Mosquitto: the broker
the compose file runs (with only its container paths and port moved to a temporary directory
and a loopback port) takes the bootstrap's admin, lets the control plane's own DynsecAdmin
manage a device, refuses anonymous clients, and a second bootstrap run keeps what the broker
saved."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.broker_admin import DynsecAdmin
from control_plane.errors import BrokerAdminError
from control_plane.local_broker import find_dynsec_plugin, free_port
from tests.deploy import deploy_files as files

ADMIN = "edged-control-plane"
CONTAINER_DATA = "/mosquitto/data/"
SUCCESS, NOT_AUTHORIZED = 0x00, 0x87
WAIT = 10.0


def _dynsec_init() -> Any:
    spec = importlib.util.spec_from_file_location("dynsec_init", files.DEPLOY / "dynsec_init.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dynsec_init = _dynsec_init()


class Broker:
    """Mosquitto on deploy/mosquitto/mosquitto.conf, moved to `workdir` and a loopback port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        plugin = find_dynsec_plugin()
        assert plugin is not None, "Mosquitto's dynamic security plugin is not installed"
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.state = workdir / "dynamic-security.json"
        text = files.MOSQUITTO_CONF.read_text()
        moved = {
            "listener 1883\n": f"listener {self.port} 127.0.0.1\n",
            f"plugin {files.mosquitto_option('plugin')}\n": f"plugin {plugin}\n",
            CONTAINER_DATA: f"{workdir}/",
        }
        for old, new in moved.items():
            assert old in text, f"mosquitto.conf no longer has {old!r}"
            text = text.replace(old, new)
        if os.geteuid() == 0:  # as root Mosquitto drops to `mosquitto`, which cannot write here
            text += "user root\n"
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(text)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "mosquitto.out").open("ab") as output:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + WAIT
        while True:
            assert self.process.poll() is None, self.log()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: the plugin and the persistence file are saved."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(WAIT)
        self.process = None

    def log(self) -> str:
        return (self.workdir / "mosquitto.out").read_text(errors="replace")


@pytest.fixture
def broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(mosquitto_binary, tmp_path)
    yield broker
    broker.stop()


def _bootstrap(
    broker: Broker,
    password: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """Run deploy/dynsec_init.py as broker-init runs it (settings from EDGED_CP_*); its line."""
    secret = broker.workdir / "broker-admin-password"
    secret.write_text(password + "\n")
    monkeypatch.setenv("EDGED_CP_BROKER_ADMIN_USERNAME", ADMIN)
    monkeypatch.setenv("EDGED_CP_BROKER_ADMIN_PASSWORD_FILE", str(secret))
    assert dynsec_init.main([str(broker.state)]) == 0
    return str(capsys.readouterr().out)


def _connack(port: int, username: str | None, password: str | None, client_id: str) -> int:
    """The CONNACK reason code a fresh MQTT 5 client gets."""
    done = threading.Event()
    codes: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        codes.append(reason.value)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert done.wait(WAIT), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


async def _grant(broker: Broker, password: str, device: str, device_password: str) -> None:
    async with DynsecAdmin("127.0.0.1", broker.port, ADMIN, password) as admin:
        await admin.grant_device(device, device_password)


def test_deploy_broker_takes_the_admin_and_its_devices(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The deploy configuration loads the plugin with the bootstrap's state: the control
    plane's DynsecAdmin logs in with the password file and grants a device, which can then
    log in (with its own client id only); anonymous clients are refused."""
    password = "admin-" + uuid.uuid4().hex
    assert "written" in _bootstrap(broker, password, monkeypatch, capsys)
    broker.start()
    device, device_password = "dev-00112233aabbccdd", uuid.uuid4().hex
    asyncio.run(_grant(broker, password, device, device_password))
    assert _connack(broker.port, device, device_password, device) == SUCCESS
    assert _connack(broker.port, device, device_password, "someone-else") != SUCCESS
    assert _connack(broker.port, None, None, "anonymous") == NOT_AUTHORIZED
    with pytest.raises(BrokerAdminError, match="refused the admin login"):
        asyncio.run(_grant(broker, "wrong", device, device_password))


def test_a_second_bootstrap_keeps_what_the_broker_saved(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run again (every `docker compose up`), the bootstrap leaves the file the broker saved
    byte for byte when the admin is already current; with a new password it rewrites the
    admin and keeps the devices, and the broker then takes the new password only."""
    password = "admin-" + uuid.uuid4().hex
    _bootstrap(broker, password, monkeypatch, capsys)
    broker.start()
    device, device_password = "dev-ffeeddccbbaa0099", uuid.uuid4().hex
    asyncio.run(_grant(broker, password, device, device_password))
    broker.stop()
    saved = broker.state.read_bytes()
    assert device.encode() in saved

    assert "already current" in _bootstrap(broker, password, monkeypatch, capsys)
    assert broker.state.read_bytes() == saved

    rotated = "admin-" + uuid.uuid4().hex
    assert "written" in _bootstrap(broker, rotated, monkeypatch, capsys)
    assert device in {c["username"] for c in json.loads(broker.state.read_text())["clients"]}
    broker.start()
    assert _connack(broker.port, device, device_password, device) == SUCCESS
    asyncio.run(_grant(broker, rotated, device, device_password))
    with pytest.raises(BrokerAdminError, match="refused the admin login"):
        asyncio.run(_grant(broker, password, device, device_password))


@pytest.mark.parametrize(
    ("state", "secret", "sentence"),
    [
        ("{not json", "pw", "is not JSON"),
        ("[]", "pw", "does not hold a JSON object"),
        (None, "", "password is empty"),
        (None, None, "cannot read"),
    ],
)
def test_bootstrap_refusals_are_one_sentence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    state: str | None,
    secret: str | None,
    sentence: str,
) -> None:
    """A state file that is not a JSON object, an empty or unreadable password: exit status 2,
    one sentence on stderr, and the state file untouched."""
    path = tmp_path / "dynamic-security.json"
    if state is not None:
        path.write_text(state)
    password_file = tmp_path / "password"
    if secret is not None:
        password_file.write_text(secret)
    monkeypatch.setenv("EDGED_CP_BROKER_ADMIN_PASSWORD_FILE", str(password_file))
    assert dynsec_init.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edged-dynsec-init: ") and sentence in err and err.count("\n") == 1
    assert (path.read_text() if state is not None else None) == state
