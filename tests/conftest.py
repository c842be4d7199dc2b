"""Session fixtures shared by the whole suite: real models, real bundles, a real broker."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control_plane.local_broker import MosquittoBroker, find_mosquitto
from tests.support import scheduling
from tests.support.proxy import FaultProxy
from tests.support.shared import session_build

FIXTURES = Path(__file__).parent / "fixtures"
TF_MODELS = ("digits_float", "digits_int8_io_int8", "digits_int8_io_uint8", "digits_int8_io_float")


@pytest.fixture(scope="session")
def tf_reference() -> dict[str, np.ndarray]:
    """The 64 held-out digits the TF fixtures were checked on, with Keras' probabilities."""
    with np.load(FIXTURES / "tf" / "digits_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def tf_bundles(tmp_path_factory: pytest.TempPathFactory, tf_reference) -> dict[str, Path]:
    """Every TensorFlow-converter fixture packed into a bundle by edged's own packer."""
    from edged.packer import PackRequest, pack

    out = tmp_path_factory.mktemp("tf-bundles")
    bundles = {}
    for name in TF_MODELS:
        request = PackRequest(
            model=(FIXTURES / "tf" / f"{name}.tflite").read_bytes(),
            labels=[str(i) for i in range(10)],
            calibration=tf_reference["x"],
            calibration_labels=tf_reference["y"],
            name=name.replace("_", "-"),
            version="1.0.0",
        )
        bundles[name] = out / f"{name}.bundle"
        bundles[name].write_bytes(pack(request))
    return bundles


def _reference_build(tmp_path_factory: pytest.TempPathFactory, name: str):
    """Built once per test session (tests/support/shared.py). Read-only to tests."""
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    from control_plane.toolchain.reference import BuildReport, build_reference

    with session_build(tmp_path_factory, f"reference-{name}") as out:
        done = out / "build-report.json"
        if not done.exists():
            done.write_text(build_reference(name, out).to_json())
    return out, BuildReport(**json.loads(done.read_text()))


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory: pytest.TempPathFactory):
    """The digits reference model built end to end by the project's toolchain (torch ->
    litert-torch -> ai-edge-quantizer -> bundle). About ten seconds, once per session."""
    return _reference_build(tmp_path_factory, "digits")


@pytest.fixture(scope="session")
def sensor_build(tmp_path_factory: pytest.TempPathFactory):
    """The smartwatch IMU 1-D CNN built the same way, once per session."""
    return _reference_build(tmp_path_factory, "sensor")


MOSQUITTO_MISSING = "mosquitto not installed: run `make test`, which installs it"


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    """Path of the mosquitto binary; skips broker tests loudly when absent (fails under CI)."""
    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MOSQUITTO_MISSING} (CI must not skip the broker tests)")
        pytest.skip(MOSQUITTO_MISSING)
    return binary


@pytest.fixture(scope="session")
def mosquitto(
    mosquitto_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    """One Mosquitto for the whole session on a free 127.0.0.1 port. Shared: never stop it
    (take `broker` for that); use topics of your own."""
    with MosquittoBroker(
        binary=mosquitto_binary, workdir=tmp_path_factory.mktemp("mosquitto")
    ) as b:
        yield b


@pytest.fixture
def broker_factory(
    mosquitto_binary: str, tmp_path: Path
) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start extra brokers with options (persistence=True, max_queued_messages=..., see
    MosquittoBroker); every one is stopped after the test. Logs stay in tmp_path/broker-N."""
    started: list[MosquittoBroker] = []

    def start(**options: Any) -> MosquittoBroker:
        workdir = tmp_path / f"broker-{len(started)}"
        b = MosquittoBroker(binary=mosquitto_binary, workdir=workdir, **options)
        started.append(b)
        b.start()
        return b

    yield start
    for b in started:
        b.close()


@pytest.fixture
def broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A fresh broker for this test alone: stop(), kill() and start() it at will."""
    return broker_factory()


@pytest.fixture
def fault_proxy(broker: MosquittoBroker) -> Iterator[FaultProxy]:
    """A fault-injecting TCP proxy in front of `broker`: connect clients to its port."""
    with FaultProxy(broker.host, broker.port) as proxy:
        yield proxy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    scheduling.order(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return scheduling.make_scheduler(config, log)
