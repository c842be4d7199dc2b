"""Replay a dataset file through the engine like a live source, optionally forwarding what it
sees through the outbox and uplink: the device end of `make demo` until the daemon lands.

Each prediction becomes a relaxed `telemetry` record; predictions less confident than the
bundle's own 5 % validation quantile are kept as durable `sample` records (input, output and
embedding) for the cloud to label. The full gating policy is the daemon's (issue 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edged.engine import Engine
from edged.identity import DeviceIdentity
from edged.mqtt_link import LinkConfig
from edged.outbox import Outbox, OutboxConfig, OutboxStats
from edged.uplink import Uplink, UplinkConfig, UplinkStats

__all__ = ["ForwardTo", "ReplayReport", "replay"]


@dataclass(frozen=True, slots=True)
class ForwardTo:
    """Where replayed results go: an outbox in `state_dir` drained to a broker."""

    state_dir: Path
    host: str
    port: int
    drain_timeout_s: float = 60.0


@dataclass(slots=True)
class ReplayReport:
    samples: int = 0
    latencies_s: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    kept_samples: int = 0
    outbox: OutboxStats | None = None
    uplink: UplinkStats | None = None
    device_id: str = ""
    max_depth: int = 0


async def replay(
    engine: Engine,
    x: npt.NDArray[Any],
    *,
    rate_hz: float | None = None,
    forward: ForwardTo | None = None,
) -> ReplayReport:
    """Stream `x` one sample at a time (paced at `rate_hz` if given)."""
    report = ReplayReport()
    if forward is None:
        await _stream(engine, x, rate_hz, report, None)
        return report
    forward.state_dir.mkdir(parents=True, exist_ok=True)
    identity = DeviceIdentity.load_or_create(forward.state_dir / "device.key")
    report.device_id = identity.default_device_id()
    link = LinkConfig(forward.host, forward.port, client_id=report.device_id)
    async with Outbox(OutboxConfig(forward.state_dir / "outbox.db", min_free_bytes=0)) as outbox:
        uplink = Uplink(
            UplinkConfig(report.device_id, link, backoff_max_s=2.0), outbox, identity.signing_key
        )
        task = asyncio.create_task(uplink.run())
        try:
            await _stream(engine, x, rate_hz, report, outbox)
            await outbox.flush()
            deadline = time.monotonic() + forward.drain_timeout_s
            while outbox.stats().depth and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        report.outbox, report.uplink = outbox.stats(), uplink.stats
    return report


async def _stream(
    engine: Engine,
    x: npt.NDArray[Any],
    rate_hz: float | None,
    report: ReplayReport,
    outbox: Outbox | None,
) -> None:
    manifest = engine.manifest
    threshold = manifest.reference.confidence_quantiles.get("0.05", 0.0)
    period = 1.0 / rate_hz if rate_hz else 0.0
    started = time.monotonic()
    for index, sample in enumerate(x):
        t0 = time.perf_counter()
        prediction = engine.predict(sample[None])
        report.latencies_s.append(time.perf_counter() - t0)
        top1, confidence = int(prediction.top1[0]), float(prediction.confidence[0])
        report.top1.append(top1)
        report.confidence.append(confidence)
        report.samples += 1
        if outbox is not None:
            await outbox.put(
                "telemetry",
                {"i": index, "top1": top1, "confidence": confidence, "model": manifest.version},
            )
            if confidence < threshold:
                body: dict[str, Any] = {
                    "i": index,
                    "input": np.ascontiguousarray(sample).tobytes(),
                    "dtype": str(sample.dtype),
                    "shape": list(sample.shape),
                    "probabilities": prediction.probabilities[0].tolist(),
                    "model": manifest.version,
                }
                if prediction.embeddings is not None:
                    body["embedding"] = prediction.embeddings[0].tolist()
                await outbox.put("sample", body)
                report.kept_samples += 1
            report.max_depth = max(report.max_depth, outbox.stats().depth)
        if period:
            await asyncio.sleep(max(0.0, started + (index + 1) * period - time.monotonic()))
