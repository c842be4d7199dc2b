"""The test harness itself: a real Mosquitto child process, the fault proxy, the subscriber."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.local_broker import BrokerError, MosquittoBroker
from tests.support.proxy import FaultProxy
from tests.support.subscriber import MqttSubscriber

MESSAGES = [b"m%d" % i for i in range(5)]


class Publisher:
    """A bare paho MQTT 5 client that records PUBACKs and disconnects."""

    def __init__(self, host: str, port: int) -> None:
        self.acked: set[int] = set()
        self._acks = threading.Condition()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        self.client.on_connect = lambda c, u, f, reason, p: self.connected.set()
        self.client.on_disconnect = lambda c, u, f, reason, p: self.disconnected.set()
        self.client.on_publish = self._on_publish
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # type: ignore[arg-type]
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(5):
            self.close()
            raise TimeoutError(f"no CONNACK from {host}:{port}")

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, *_: object) -> None:
        with self._acks:
            self.acked.add(mid)
            self._acks.notify_all()

    def publish(self, topic: str, payload: bytes) -> int:
        return self.client.publish(topic, payload, qos=1).mid

    def wait_acked(self, mids: set[int], timeout: float = 5) -> None:
        with self._acks:
            if not self._acks.wait_for(lambda: mids <= self.acked, timeout):
                raise TimeoutError(f"no PUBACK for {sorted(mids - self.acked)}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def topic() -> str:
    """A topic no other test publishes on."""
    return f"test/{uuid.uuid4().hex[:8]}"


def round_trip(host: str, port: int, topic: str) -> list[bytes]:
    """Publish MESSAGES with QoS 1, wait for every PUBACK, return what a subscriber got."""
    with MqttSubscriber(host, port, topic) as sub:
        pub = Publisher(host, port)
        try:
            pub.wait_acked({pub.publish(topic, m) for m in MESSAGES})
            sub.wait_count(len(MESSAGES))
        finally:
            pub.close()
        return sub.payloads()


def is_reset(host: str, port: int) -> bool:
    """Whether a new connection is reset (in connect() or at the first read) rather than
    closed normally or left open."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.recv(1)
    except ConnectionResetError:
        return True
    return False


def test_round_trip_qos1(mosquitto: MosquittoBroker, topic: str) -> None:
    """A QoS 1 publish through the session broker is acknowledged and delivered in order."""
    assert round_trip(mosquitto.host, mosquitto.port, topic) == MESSAGES


def test_kill_and_restart_same_port(broker: MosquittoBroker, topic: str) -> None:
    """After SIGKILL the port refuses connections; start() brings the broker back on it."""
    port, pid = broker.port, broker.pid
    broker.kill()
    assert not broker.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((broker.host, port), timeout=1).close()
    broker.start()
    assert (broker.port, broker.running) == (port, True)
    assert broker.pid != pid
    assert round_trip(broker.host, broker.port, topic) == MESSAGES


def test_persistence_survives_stop_and_start(
    broker_factory: Callable[..., MosquittoBroker], topic: str
) -> None:
    """With persistence on, stop() saves the database: a retained message survives a restart."""
    b = broker_factory(persistence=True)
    pub = Publisher(b.host, b.port)
    try:
        pub.wait_acked({pub.client.publish(topic, b"kept", qos=1, retain=True).mid})
    finally:
        pub.close()
    b.stop()
    assert "terminating" in b.log_tail()
    b.start()
    with MqttSubscriber(b.host, b.port, topic) as sub:
        assert sub.wait_count(1)[0].payload == b"kept"


def test_start_failure_reports_the_log(mosquitto_binary: str, tmp_path: Path) -> None:
    """A broker that cannot start raises BrokerError carrying Mosquitto's own complaint."""
    bad = MosquittoBroker(binary=mosquitto_binary, workdir=tmp_path, extra_config=["bogus 1"])
    with pytest.raises(BrokerError, match=r"(?s)exited with status \d+.*bogus"):
        bad.start()
    assert not bad.running


def test_subscriber_resubscribes_after_restart(broker: MosquittoBroker, topic: str) -> None:
    """The receiving side reconnects and subscribes again after the broker restarts."""
    with MqttSubscriber(broker.host, broker.port, topic) as sub:
        broker.kill()
        broker.start()
        sub.wait_subscribed(5)
        pub = Publisher(broker.host, broker.port)
        try:
            pub.publish(topic, b"again")
            assert sub.wait_count(1)[0].payload == b"again"
        finally:
            pub.close()
        assert sub.connects == 2


def test_pause_downstream_withholds_the_puback(
    broker: MosquittoBroker, fault_proxy: FaultProxy, topic: str
) -> None:
    """While downstream is paused the broker gets the PUBLISH but the client sees no PUBACK;
    after a cut and a reconnect paho sends it again, so the receiver gets it twice."""
    with MqttSubscriber(broker.host, broker.port, topic) as sub:
        pub = Publisher(fault_proxy.host, fault_proxy.port)
        try:
            fault_proxy.pause_downstream()
            mid = pub.publish(topic, b"once")
            assert sub.wait_count(1)[0].payload == b"once"
            with pytest.raises(TimeoutError):
                pub.wait_acked({mid}, timeout=0.3)
            fault_proxy.cut()
            assert pub.disconnected.wait(5)
            fault_proxy.resume_downstream()
            pub.wait_acked({mid})
            assert sub.wait_count(2) == [(topic, b"once"), (topic, b"once")]
        finally:
            pub.close()
        assert fault_proxy.bytes_upstream > 0 and fault_proxy.bytes_downstream > 0


def test_cut_disconnects_the_client(fault_proxy: FaultProxy) -> None:
    """cut() resets the connection: paho's on_disconnect fires and the client reconnects."""
    pub = Publisher(fault_proxy.host, fault_proxy.port)
    try:
        fault_proxy.wait_connections(1)
        pub.connected.clear()
        fault_proxy.cut()
        assert pub.disconnected.wait(5)
        assert pub.connected.wait(5), "paho did not reconnect through the proxy"
    finally:
        pub.close()
    assert fault_proxy.cuts == 1


def test_refuse_simulates_a_broker_down(fault_proxy: FaultProxy) -> None:
    """While refusing, new connections are reset before reaching the broker; then they pass."""
    fault_proxy.refuse(True)
    assert is_reset(fault_proxy.host, fault_proxy.port)
    assert (fault_proxy.connections_refused, fault_proxy.bytes_upstream) == (1, 0)
    fault_proxy.refuse(False)
    Publisher(fault_proxy.host, fault_proxy.port).close()
    assert fault_proxy.bytes_downstream > 0  # the CONNACK came through


@pytest.mark.asyncio
async def test_proxy_controls_from_async_code(fault_proxy: FaultProxy) -> None:
    """The proxy's controls work inside a running event loop (the proxy has its own)."""
    reader, writer = await asyncio.open_connection(fault_proxy.host, fault_proxy.port)
    try:
        await asyncio.to_thread(fault_proxy.wait_connections, 1)
        fault_proxy.cut()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
    finally:
        writer.close()
        with pytest.raises(ConnectionResetError):
            await writer.wait_closed()
