"""The edged daemon: `edged run --config /etc/edged/edged.toml`, a systemd `Type=notify` service.

Start: configuration, device key, model slots (edged.ota.slots: adopt the configured bundle on a
first start, count a trial's start, roll back a crash loop before loading), the active slot's
model (verified, loaded, checked, first inference run; the known good one if it fails), outbox,
sample store, uplink, local bus, sources; then READY=1. While serving: WATCHDOG=1 from the loop
(only while inference makes progress), a STATUS= line, telemetry every interval, `edged status`
over a unix socket. SIGHUP reloads the configuration without dropping a sample; SIGTERM stops
the sources, drains what is queued, flushes the outbox and exits within `drain_timeout_s`.

Models change only through `Daemon.install` (the updater's entry point; a changed
`device.model` goes the same way): stage into the inactive slot, switch, health trial
(edged.ota.trial), commit or roll back, each step an `ota.*` event in the outbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import edged_formats
from edged.budget import BudgetConfig
from edged.config import (
    Config,
    ConfigError,
    MqttSourceConfig,
    ReplaySourceConfig,
    SpoolSourceConfig,
    load_config,
)
from edged.engine import Engine, EngineOptions
from edged.enrollment import load_enrollment
from edged.errors import EdgedError
from edged.finetune.manager import HttpPersonalisation, Personaliser
from edged.health import HealthProbe
from edged.identity import DeviceIdentity
from edged.labels import LabelStore
from edged.local_bus import LocalBus, MqttSource
from edged.logs import RateLimitedLog, configure_logging, log_event
from edged.mqtt_link import LinkConfig
from edged.notify import Notifier
from edged.ota.install import Installer, load_serving
from edged.ota.slots import Slots
from edged.ota.trial import InstallOutcome
from edged.ota.updater import Updater, updater_for
from edged.outbox import MIB, Outbox, OutboxConfig
from edged.pipeline import Pipeline, ResultSink
from edged.sample_store import SampleStore
from edged.sources import ReplaySource, Source, SpoolSource
from edged.uplink import Uplink, UplinkConfig

__all__ = ["Daemon", "run_daemon"]

log = logging.getLogger("edged.daemon")
STOP_MARGIN_S = 10.0  # beyond the drain and the uplink's grace, for telemetry and the flush
RESTART_ONLY = ("device", "engine", "pipeline", "source", "local_mqtt", "uplink", "outbox")
# [finetune] changes apply at once, except these (they shape storage and subscriptions)
FINETUNE_RESTART_ONLY = ("enabled", "truth_topic", "max_labels", "max_label_mb")


def _secret(path: Path | None) -> str | None:
    return None if path is None else path.read_text(encoding="utf-8").strip()


def _load_sink(spec: str) -> ResultSink:
    """`package.module:factory`, where factory() returns a callable taking a Result."""
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
        sink = factory()
    except Exception as exc:
        raise ConfigError(f"plug-in {spec} cannot be loaded: {exc!r}") from exc
    if not callable(sink):
        raise ConfigError(f"plug-in {spec} did not return a callable")
    return sink


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.state = "starting"
        self.bad_input = RateLimitedLog(logging.getLogger("edged.input"))
        self._rates: collections.deque[tuple[float, int]] = collections.deque(maxlen=61)
        self._reloads: set[asyncio.Task[Any]] = set()
        self._failed = False
        self.updater: Updater | None = None
        self.personaliser: Personaliser | None = None

    # -- start ------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
        cfg = self.config
        cfg.device.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity = DeviceIdentity.load_or_create(cfg.device.state_dir / "device.key")
        self.enrollment = (
            load_enrollment(cfg.device.state_dir) if cfg.uplink.username is None else None
        )
        self.device_id = (
            cfg.uplink.device_id
            or (self.enrollment.device_id if self.enrollment else None)
            or self.identity.default_device_id()
        )
        options = EngineOptions(cfg.engine.runtime, cfg.engine.threads, True, cfg.engine.max_batch)
        self.slots = Slots(cfg.device.state_dir / "models")
        self.engine, notes = await asyncio.to_thread(
            load_serving,
            self.slots,
            cfg.device.model,
            cfg.update.max_start_attempts,
            lambda path: Engine.from_file(path, options),
        )
        self.probe = HealthProbe(cfg.device.state_dir)
        outbox_config = OutboxConfig(
            cfg.device.state_dir / "outbox.db",
            quota_bytes=cfg.outbox.quota_mb * MIB,
            min_free_bytes=cfg.outbox.min_free_mb * MIB,
        )
        async with (
            Outbox(outbox_config) as self.outbox,
            SampleStore(cfg.device.state_dir / "samples.db") as store,
            LabelStore(
                cfg.device.state_dir / "labels.db",
                cfg.finetune.max_labels,
                cfg.finetune.max_label_mb * MIB,
            ) as labels,
        ):
            for name, detail in notes:
                await self._event(name, **detail)
            sinks = [_load_sink(spec) for spec in cfg.plugins]
            try:
                self.pipeline = Pipeline(
                    self.engine,
                    gating=cfg.gating,
                    drift=cfg.drift,
                    outbox=self.outbox,
                    store=store,
                    queue_size=cfg.pipeline.queue_size,
                    max_pending_writes=cfg.pipeline.max_pending_writes,
                    sinks=sinks,
                    bad_input=self.bad_input,
                    budget_file=cfg.device.state_dir / "gating-budget.json",
                )
            except ValueError as exc:  # the [gating] section and this model's outputs
                manifest = self.engine.manifest
                raise ConfigError(
                    f"[gating] does not fit model {manifest.name} {manifest.version}: {exc}"
                ) from exc
            self.installer = Installer(
                self.slots,
                self.engine,
                update=lambda: self.config.update,
                model_swapped=self.pipeline.model_swapped,
                inference_errors=lambda: self.bad_input.counts().get("inference", 0),
                emit=self._event,
                restore_failed=self._restore_failed,
            )
            self.pipeline.sinks.insert(0, self.installer.observe)
            if cfg.finetune.enabled:
                self.personaliser = self._personaliser(labels, store)
            try:
                return await self._serve()
            finally:
                self.pipeline.close()

    def _personaliser(self, labels: LabelStore, store: SampleStore) -> Personaliser:
        state_dir = self.config.device.state_dir
        control = None
        if self.enrollment is not None:
            control = HttpPersonalisation(
                self.enrollment.url,
                self.enrollment.api_token(state_dir),
                timeout_s=self.config.update.timeout_s,
            )
        personaliser = Personaliser(
            lambda: self.config.finetune,
            state_dir,
            labels,
            store,
            self.installer,
            self.install,
            self._event,
            device_id=self.device_id,
            control=control,
            poll_s=self.config.update.poll_s,
            bad_input=self.bad_input,
        )
        self.pipeline.recent = personaliser.intake.recent
        self.pipeline.drift_listeners.append(personaliser.drifted)
        self.pipeline.sinks.append(personaliser.intake.observe)
        return personaliser

    def _uplink(self, identity_key: Any) -> Uplink:
        up = self.config.uplink
        enrolled = self.enrollment
        link = LinkConfig(
            enrolled.broker_host if enrolled else up.host,
            enrolled.broker_port if enrolled else up.port,
            client_id=self.device_id,
            username=enrolled.username if enrolled else up.username,
            password=_secret(
                enrolled.password_file(self.config.device.state_dir)
                if enrolled
                else up.password_file
            ),
            tls=enrolled.broker_tls if enrolled else up.tls,
            ca_file=None if up.ca_file is None else str(up.ca_file),
            cert_file=None if up.cert_file is None else str(up.cert_file),
            key_file=None if up.key_file is None else str(up.key_file),
        )
        budget = BudgetConfig(bytes_per_s=up.bytes_per_s, bytes_per_day=up.bytes_per_day)
        return Uplink(
            UplinkConfig(self.device_id, link, budget=budget),
            self.outbox,
            identity_key,
            on_command=self._command,
        )

    def _command(self, name: str, payload: bytes) -> None:
        """edged/v1/<id>/cmd/<name> from the control plane: `update` means "ask now";
        `personalisation` carries labels and the operator's switch (docs/finetune.md)."""
        if name == "update" and self.updater is not None:
            self.updater.notify()
        elif name == "personalisation" and self.personaliser is not None:
            self.personaliser.intake.command(payload)

    def _updater(self) -> Updater | None:
        if not self.config.update.enabled or self.enrollment is None:
            return None  # updates need the control plane's URL and this device's API token
        personaliser = self.personaliser
        return updater_for(
            self.config,
            self.enrollment,
            self.installer,
            self.install,
            self._event,
            base_of=None if personaliser is None else personaliser.serving_base,
        )

    def _sources(self) -> tuple[list[Source], list[MqttSource]]:
        shape = self.engine.sample_shape
        dtype = self.engine.manifest.input.dtype
        sources: list[Source] = []
        mqtt: list[MqttSource] = []
        for spec in self.config.source:
            if isinstance(spec, ReplaySourceConfig):
                sources.append(ReplaySource(spec, self.outbox))
            elif isinstance(spec, SpoolSourceConfig):
                sources.append(SpoolSource(spec, shape, dtype, self.pipeline.refuse))
            elif isinstance(spec, MqttSourceConfig):
                source = MqttSource(
                    spec, shape, dtype, self.pipeline.refuse, self.config.pipeline.queue_size
                )
                sources.append(source)
                mqtt.append(source)
        return sources, mqtt

    async def _serve(self) -> int:
        cfg = self.config
        sources, mqtt_sources = self._sources()
        self.bus: LocalBus | None = None
        if cfg.local_mqtt is not None:
            handlers = {}
            if self.personaliser is not None:
                handlers[cfg.finetune.truth_topic] = self.personaliser.intake.truth
            self.bus = LocalBus(
                cfg.local_mqtt,
                f"{self.device_id}-local",
                mqtt_sources,
                cfg.pipeline.queue_size,
                handlers,
            )
            bus = self.bus
            self.pipeline.sinks.insert(0, lambda result: bus.publish_result(result.to_json()))
            await self.bus.start()
        self.updater = self._updater()
        self.uplink = self._uplink(self.identity.signing_key) if cfg.uplink.enabled else None
        status_server = await self._status_server()
        background: list[asyncio.Task[Any]] = [
            asyncio.create_task(self.pipeline.run(), name="pipeline"),
            asyncio.create_task(self._ticker(), name="ticker"),
            asyncio.create_task(self._telemetry_loop(), name="telemetry"),
        ]
        if self.uplink is not None:
            background.append(asyncio.create_task(self.uplink.run(), name="uplink"))
        if self.updater is not None:
            background.append(asyncio.create_task(self.updater.run(), name="updater"))
        finetune = []  # stopped with the sources: no fine-tune job starts while stopping
        if self.personaliser is not None:
            finetune.append(asyncio.create_task(self.personaliser.run(), name="finetune"))
            background += finetune
        source_tasks = [
            asyncio.create_task(s.run(self.pipeline.submit), name=f"source {s.name}")
            for s in sources
        ]
        for task in source_tasks:
            task.add_done_callback(self._source_ended)
        self.state = "running"
        manifest = self.engine.manifest
        log_event(
            log,
            "info",
            "ready",
            device=self.device_id,
            model=manifest.name,
            version=manifest.version,
            slot=self.slots.state.active,
            trial=self.slots.state.trial is not None,
            sources=",".join(s.name for s in sources) or "none",
        )
        self.notifier.ready(self._status_line())
        if self.slots.state.trial is not None:
            self._spawn(self.installer.resume_trial(), "trial")
        else:
            self._spawn(self.installer.install_configured(cfg.device.model), "configured model")
        failed = await self._wait_for_stop(background)
        stop = asyncio.create_task(self._stop([*source_tasks, *finetune], background))
        bound = cfg.pipeline.drain_timeout_s + cfg.uplink.stop_grace_s + STOP_MARGIN_S
        done, _ = await asyncio.wait([stop], timeout=bound)
        if not done:  # a stop is bounded: say what it waits for, and exit non-zero
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    where = " < ".join(
                        f"{frame.f_code.co_name}:{frame.f_lineno}" for frame in task.get_stack()
                    )
                    log_event(log, "error", "stop_stuck", task=task.get_name(), at=where)
            log_event(log, "error", "stop_timeout", bound_s=bound)
            failed = True
        status_server.close()
        await status_server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            cfg.status.socket.unlink()
        return 1 if failed or self._failed else 0

    async def _wait_for_stop(self, background: list[asyncio.Task[Any]]) -> bool:
        """Until SIGTERM, or a background task dies (a bug): then exit non-zero so systemd
        restarts the service."""
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, *background], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in done:
            if task is not stop and not task.cancelled() and task.exception() is not None:
                log_event(
                    log, "error", "task_failed", task=task.get_name(), exc_info=task.exception()
                )
                return True
        return False

    def _spawned_ended(self, task: asyncio.Task[Any]) -> None:
        """An install or trial the daemon started itself died of a bug or the disk: say so."""
        if not task.cancelled() and task.exception() is not None:
            log_event(log, "error", "task_failed", task=task.get_name(), exc_info=task.exception())

    def _source_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, (EdgedError, ValueError, OSError)):  # a bad file or path: one line
            log_event(log, "error", "source_failed", source=task.get_name(), reason=str(exc))
        elif exc is not None:
            log_event(log, "error", "source_failed", source=task.get_name(), exc_info=exc)

    # -- stop -------------------------------------------------------------------------------

    async def _stop(
        self, first: list[asyncio.Task[Any]], background: list[asyncio.Task[Any]]
    ) -> None:
        """Stop `first` (the sources, the fine-tune manager), drain what is queued, send what
        the link takes, then stop the rest."""
        self.state = "draining"
        self.notifier.stopping(f"draining {self.pipeline.depth} queued samples")
        log_event(log, "info", "stopping", queued=self.pipeline.depth)
        for task in first:
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        try:
            async with asyncio.timeout(self.config.pipeline.drain_timeout_s):
                await self.pipeline.drain()
        except TimeoutError:
            log_event(log, "warning", "drain_timeout", left=self.pipeline.depth)
        await self._send_telemetry()
        await self.outbox.flush()
        await self._last_uploads()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self.bus is not None:
            await self.bus.close()
        log_event(log, "info", "stopped", inferred=self.pipeline.counts.inferred)

    async def _last_uploads(self) -> None:
        """While connected, give the uplink `stop_grace_s` to send what is queued; anything
        left waits in the outbox for the next start."""
        if self.uplink is None or not self.uplink.connected.is_set():
            return
        deadline = time.monotonic() + self.config.uplink.stop_grace_s
        while self.outbox.stats().depth and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- reload -----------------------------------------------------------------------------

    def _reload_soon(self) -> None:
        task = asyncio.create_task(self.reload(), name="reload")
        self._reloads.add(task)  # keep a reference until it is done
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """SIGHUP: re-read the file; apply gating, drift, telemetry, log and model changes in
        place. Sections that shape connections or storage take effect at the next restart."""
        if self.config_path is None or self.state != "running":
            return
        self.notifier.reloading("reloading configuration")
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log_event(log, "error", "reload_refused", reason=str(exc))
            self.notifier.ready(self._status_line())
            return
        try:
            self.pipeline.reconfigure(new.gating, new.drift)
        except ValueError as exc:
            log_event(log, "error", "reload_refused", reason=str(exc))
            self.notifier.ready(self._status_line())
            return
        old, self.config = self.config, new
        configure_logging(new.log.level, new.log.format)
        self._spawn(self.installer.install_configured(new.device.model), "configured model")
        later = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        later += [
            f"finetune.{key}"
            for key in FINETUNE_RESTART_ONLY
            if getattr(new.finetune, key) != getattr(old.finetune, key)
        ]
        later = [
            name
            for name in later
            if name != "device" or new.device.state_dir != old.device.state_dir
        ]
        log_event(log, "info", "reloaded", restart_needed_for=",".join(later) or "nothing")
        self.notifier.ready(self._status_line())

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._reloads.add(task)  # keep a reference until it is done
        task.add_done_callback(self._reloads.discard)
        task.add_done_callback(self._spawned_ended)

    # -- model installs (docs/ota.md) -------------------------------------------------------

    async def install(
        self,
        bundle: bytes | Path,
        sha256: str,
        version: str,
        *,
        context: Mapping[str, str] | None = None,
        judge_confidence: bool = True,
    ) -> InstallOutcome:
        """Install an already verified bundle safely; the one way a model changes.

        `bundle` is the artifact (bytes, or a file to read), `sha256` its verified digest (hex)
        and `version` the version the signed metadata names (the manifest must say the same).
        `context` holds fields every event of this install carries (the updater passes
        `rollout` and `target`); they are kept in the trial record, so a verdict reached after
        a restart carries them too. Steps, each an event in the outbox, body
        `{"name": ..., **context, "version": ..., ...}`:

        1. checks: one install at a time, no trial running, the digest, the bundle format,
           the version, the same sample shape and dtype as the serving model; any failure:
           `ota.refused` {reason}, outcome "refused", nothing switched;
        2. the bytes are written into the inactive slot and read back (`ota.staged` {slot,
           sha256}); a file changed on disk is refused as in 1;
        3. the trial and the new active slot are recorded, then the engine swaps
           (`ota.switched` {slot, previous});
        4. the health trial (canaries, then `[update] watch_s` of live traffic);
        5. `ota.committed` {reason, figures} (outcome "committed"), or the known good model
           is restored and `ota.rolled_back` {reason, restored, figures} (outcome
           "rolled_back"); the figures are top-level keys: canary_agreement, error_rate,
           confidence_before, confidence_after, latency_ratio, latency_before_ms,
           latency_after_ms, samples, baseline_samples, watched_s (None: not measured).

        Returns when the trial has its verdict (up to `watch_s` after the switch). A stop or a
        crash before that leaves the trial recorded: the next start counts it, rolls it back
        past `max_start_attempts` (`ota.rolled_back`), and otherwise serves it
        (`ota.trial_resumed` {attempts}) and runs its trial again. Never raises for a bad
        bundle or a failing model (only OSError when the disk fails to take the commit or
        rollback record; the recorded state then decides at the next start); cancelling it
        is a stop (as above). Before READY or while stopping it refuses without an event.
        `judge_confidence=False` leaves the confidence shift out of the trial: an operator's
        return to the base is expected to be less sure on the data the replaced model was
        personalised for."""
        if self.state != "running":
            return InstallOutcome("refused", version, f"the daemon is {self.state}, not serving")
        return await self.installer.install(
            bundle, sha256, version, context=dict(context or {}), judge_confidence=judge_confidence
        )

    def _restore_failed(self, reason: str) -> None:
        """The known good model would not load back after a rollback: exit 1, so the next
        start serves it or says why."""
        self._failed = True
        self.stopping.set()

    async def _event(self, name: str, **detail: Any) -> None:
        """A durable event in the outbox (and a log line, byte strings by their size)."""
        log_event(log, "info", name, **_loggable(detail))
        try:
            await self.outbox.put("event", {"name": name, **detail})
        except EdgedError as exc:
            log_event(log, "error", "event_not_stored", event=name, reason=str(exc))

    # -- periodic work ----------------------------------------------------------------------

    async def _ticker(self) -> None:
        """Every second: rates, STATUS=, and WATCHDOG=1 while the pipeline makes progress
        (an invoke or a post stage stuck for two intervals stops the pings)."""
        interval = self.notifier.watchdog_interval_s
        tick = min(1.0, interval) if interval else 1.0
        last_status = time.monotonic()  # READY=1 carried the first STATUS
        while True:
            now = time.monotonic()
            counts = self.pipeline.counts
            self._rates.append((now, counts.inferred))
            if interval is None or self.pipeline.stalled_for() < 2 * interval:
                self.notifier.watchdog()
            if now - last_status >= 5:
                self.notifier.status(self._status_line())
                last_status = now
            await asyncio.sleep(tick)

    def _rate(self) -> float:
        if len(self._rates) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rates[0], self._rates[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _status_line(self) -> str:
        return (
            f"model {self.engine.manifest.name} {self.engine.manifest.version}; "
            f"{self._rate():.1f} samples/s; queue {self.pipeline.depth}; "
            f"outbox {self.outbox.stats().depth}"
        )

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.telemetry.interval_s)
            await self._send_telemetry()

    async def _send_telemetry(self) -> None:
        body = self.status()
        body.pop("outbox_detail", None)
        body["health"] = self.probe.sample()
        try:
            await self.outbox.put("telemetry", body)
        except EdgedError as exc:
            log_event(log, "warning", "telemetry_not_stored", reason=str(exc))

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything `edged status` shows; also the body of each telemetry record."""
        counts = self.pipeline.counts
        outbox = self.outbox.stats()
        uplink = self.uplink.stats if self.uplink is not None else None
        manifest = self.engine.manifest
        return {
            "device_id": self.device_id,
            "software_version": edged_formats.__version__,
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                # a personalised model's lineage: the cloud model it derives from
                "base": None
                if manifest.personalisation is None
                else manifest.personalisation.base_version,
            },
            "slots": self.installer.status(),
            "update": None if self.updater is None else self.updater.status(),
            "finetune": None if self.personaliser is None else self.personaliser.status(),
            "rate_per_s": round(self._rate(), 2),
            "queue_depth": self.pipeline.depth,
            "counts": {
                "received": counts.received,
                "inferred": counts.inferred,
                "batches": counts.batches,
                "kept": counts.kept,
                "uploaded": counts.uploaded,
                "write_failures": counts.write_failures,
            },
            "per_class": dict(counts.per_class),
            "gating": self.pipeline.gating_counts.as_dict(),
            "drift": {**self.pipeline.drift.summary(), "alarms": self.pipeline.alarms[-4:]},
            "latency_ms": self.pipeline.latency.percentiles(),
            "bad_input": self.bad_input.counts(),
            "outbox": {
                "depth": outbox.depth,
                "bytes": outbox.stored_bytes,
                "dropped": sum(c.dropped_quota + c.expired for c in outbox.by_class.values()),
                "refused": sum(c.refused for c in outbox.by_class.values()),  # no room at all
                "recovered": outbox.recovered,  # why a damaged file was replaced, if it was
            },
            "uplink": None
            if uplink is None
            else {
                "state": uplink.state,
                "records": uplink.records,
                # the last failure matters while not connected; once back it is history
                "error": "" if uplink.state == "connected" else uplink.last_error,
            },
            "local_bus": None
            if self.bus is None
            else {"connected": self.bus.connected.is_set(), "published": self.bus.published},
        }

    async def _status_server(self) -> asyncio.AbstractServer:
        path = self.config.status.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

        async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(json.dumps(self.status(), default=str).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_unix_server(answer, path=str(path))
        os.chmod(path, 0o660)
        return server


def _loggable(value: Any) -> Any:
    """`value` with byte strings replaced by "<N bytes>", for a log line."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _loggable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_loggable(v) for v in value]
    return value


async def run_daemon(config: Config, config_path: Path | None) -> int:
    return await Daemon(config, config_path).run()
