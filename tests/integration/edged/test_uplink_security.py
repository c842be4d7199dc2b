"""The uplink against a broker that demands TLS, a client certificate or a password: it
connects with the right credentials, and with the wrong ones it keeps every record and
retries."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from edged.mqtt_link import LinkConfig
from edged.outbox import Outbox, OutboxConfig
from edged.uplink import Uplink, UplinkConfig
from tests.integration.edged.test_uplink import DEVICE, KEY, drained, until


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=edged-test-ca",
        cwd=root,
    )
    for name, extension in [
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ]:
        openssl(
            "req",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=root,
        )
        (root / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=root,
        )
    return root


def password_file(tmp_path: Path, password: str) -> Path:
    """A Mosquitto password file with the test device's password."""
    path = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(path), DEVICE, password],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def acl_link(tmp_path: Path, broker_factory, writable: list[str]) -> LinkConfig:
    """A broker that needs the device's password and lets it write only `writable` topics;
    the link config to reach it."""
    acl = tmp_path / "acl"
    acl.write_text(f"user {DEVICE}\n" + "".join(f"topic write {t}\n" for t in writable))
    broker = broker_factory(
        extra_config=[
            "allow_anonymous false",
            f"password_file {password_file(tmp_path, 'pw')}",
            f"acl_file {acl}",
        ]
    )
    return LinkConfig("127.0.0.1", broker.port, client_id=DEVICE, username=DEVICE, password="pw")


async def run_until_drained_or_failing(tmp_path: Path, link: LinkConfig) -> tuple[int, object]:
    """Queue 20 records, run the uplink; return what is left and the uplink's stats."""
    config = OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0)
    async with Outbox(config) as outbox:
        await outbox.put_many("event", [{"n": i} for i in range(20)])
        uplink = Uplink(
            UplinkConfig(DEVICE, link, backoff_initial_s=0.05, backoff_max_s=0.2), outbox, KEY
        )
        task = asyncio.create_task(uplink.run())
        try:
            done = asyncio.ensure_future(drained(outbox, timeout=10))
            failing = asyncio.ensure_future(
                asyncio.wait_for(until(lambda: uplink.stats.connect_failures >= 3), 10)
            )
            await asyncio.wait({done, failing}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (done, failing):
                waiter.cancel()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return outbox.stats().depth, uplink.stats


async def test_tls_with_client_certificate(tmp_path, pki, broker_factory) -> None:
    """With the CA and a client certificate the uplink drains over TLS; without the client
    certificate the broker refuses it and the records stay in the outbox."""
    broker = broker_factory(
        extra_config=[
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
            "require_certificate true",
        ]
    )
    good = LinkConfig(
        "127.0.0.1",
        broker.port,
        client_id=DEVICE,
        ca_file=str(pki / "ca.crt"),
        cert_file=str(pki / "client.crt"),
        key_file=str(pki / "client.key"),
    )
    left, stats = await run_until_drained_or_failing(tmp_path / "good", good)
    assert left == 0 and stats.records == 20
    no_client_cert = LinkConfig(
        "127.0.0.1", broker.port, client_id=DEVICE, ca_file=str(pki / "ca.crt")
    )
    left, stats = await run_until_drained_or_failing(tmp_path / "bad", no_client_cert)
    assert left == 20 and stats.records == 0 and stats.connect_failures >= 3


async def test_server_certificate_is_verified(tmp_path, pki, broker_factory) -> None:
    """A broker whose certificate the device's CA did not sign is refused."""
    broker = broker_factory(
        extra_config=[
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
        ]
    )
    other_ca = LinkConfig(
        "127.0.0.1", broker.port, client_id=DEVICE, ca_file=str(pki / "client.crt")
    )  # not the CA that signed it
    left, stats = await run_until_drained_or_failing(tmp_path, other_ca)
    assert left == 20 and "TLS handshake failed" in stats.last_error


async def test_username_and_password(tmp_path, broker_factory) -> None:
    """The right password drains; a wrong one is refused by the broker, records kept."""
    passwords = password_file(tmp_path, "s3cret")
    broker = broker_factory(extra_config=["allow_anonymous false", f"password_file {passwords}"])
    good = LinkConfig(
        "127.0.0.1", broker.port, client_id=DEVICE, username=DEVICE, password="s3cret"
    )
    left, stats = await run_until_drained_or_failing(tmp_path / "good", good)
    assert left == 0 and stats.records == 20
    bad = LinkConfig("127.0.0.1", broker.port, client_id=DEVICE, username=DEVICE, password="wrong")
    left, stats = await run_until_drained_or_failing(tmp_path / "bad", bad)
    assert left == 20 and "refused" in stats.last_error
    assert "wrong" not in repr(bad) and "s3cret" not in repr(good)


async def test_broker_refusing_a_channel_holds_it_not_the_link(tmp_path, broker_factory) -> None:
    """An ACL that denies the samples topic: events still flow on the same connection, the
    samples stay in the outbox, the channel is held back (no reconnect storm), and an
    uplink_refused event says why."""
    link = acl_link(
        tmp_path, broker_factory, [f"edged/v1/{DEVICE}/events", f"edged/v1/{DEVICE}/state"]
    )
    config = OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0)
    async with Outbox(config) as outbox:
        await outbox.put_many("sample", [{"s": i} for i in range(30)])
        await outbox.put_many("event", [{"e": i} for i in range(5)])
        uplink = Uplink(UplinkConfig(DEVICE, link, refusal_hold_s=30), outbox, KEY)
        task = asyncio.create_task(uplink.run())
        try:
            await asyncio.wait_for(until(lambda: outbox.stats().by_class["event"].acked >= 6), 10)
            await asyncio.sleep(0.5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stats = outbox.stats()
    assert uplink.stats.connects == 1 and uplink.stats.refused_messages >= 1
    assert uplink.stats.held_channels == {"samples": 30}
    assert stats.by_class["sample"].stored == 30 and stats.by_class["sample"].acked == 0
    assert "0x87" in uplink.stats.last_error


async def test_refused_presence_does_not_stop_the_uplink(tmp_path, broker_factory) -> None:
    """Even when the broker refuses the device's state topic, records keep flowing."""
    link = acl_link(tmp_path, broker_factory, [f"edged/v1/{DEVICE}/events"])
    left, stats = await run_until_drained_or_failing(tmp_path, link)
    assert left == 0 and stats.records == 20 and "0x87" in stats.last_error
