"""Labels in (docs/finetune.md): the cloud's over MQTT cmd/personalisation and a cursor poll,
the application's on the local truth topic, pseudo-labels when configured; each found in the
ring of recent results or the sample store and kept in the label store. Also the operator's
switch, which arrives with the cloud's labels. Persisted in <state_dir>/finetune/state.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from edged.atomic import atomic_write
from edged.config import FinetuneConfig
from edged.engine import Engine
from edged.errors import EdgedError
from edged.labels import (
    Label,
    LabelSource,
    LabelStore,
    Recent,
    RecentResults,
    embedding_origin,
)
from edged.logs import RateLimitedLog, log_event
from edged.pipeline import Result
from edged.sample_store import SampleStore

__all__ = ["HttpPersonalisation", "LabelIntake", "PersonalisationState", "Serving"]

log = logging.getLogger("edged.finetune")
MAX_LABELS_PER_DOCUMENT = 1000


class Serving(Protocol):
    """What fine-tuning reads of the serving model (the daemon's Installer)."""

    engine: Engine

    def active_path(self) -> Path: ...

    def active_sha256(self) -> str: ...

    def trial_running(self) -> bool: ...


class HttpPersonalisation:
    """`GET /v1/device/self/personalisation?after=N` with the device's API token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def fetch(self, after: int) -> dict[str, Any]:
        try:
            response = self.client.get(
                "/v1/device/self/personalisation", params={"after": after, "limit": 1000}
            )
        except httpx.HTTPError as exc:
            raise EdgedError(f"cannot ask the control plane for labels: {exc}") from exc
        if response.status_code != 200:
            raise EdgedError(f"the control plane answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise EdgedError("the control plane's labels answer is not JSON") from exc
        if not isinstance(body, dict):
            raise EdgedError("the control plane's labels answer is not an object")
        return body


@dataclass
class PersonalisationState:
    """Persisted in <state_dir>/finetune/state.json."""

    jobs: int = 0
    mark: int = 0  # LabelStore.added when the last job started
    last_job_at: float = 0.0
    last_base: str | None = None  # sha256 of the base the last job trained on
    cloud_seq: int = 0  # highest contiguous label seq received from the control plane
    pending_seqs: list[int] = field(default_factory=list)  # received beyond a gap
    operator: bool | None = None  # the operator's switch, as last heard
    reverted_from: str | None = None  # the personalised sha256 a switch-off replaced
    rebuild: bool = False  # switched back on: personalise again without waiting for labels
    pending_job: int | None = None  # handed to the systemd unit, its result not collected yet
    pending_trigger: str = ""

    @classmethod
    def load(cls, path: Path) -> PersonalisationState:
        with contextlib.suppress(OSError, ValueError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
                return cls(**known)
        return cls()

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.__dict__).encode())


class LabelIntake:
    """Turns label messages into stored labels; `wake` tells the job loop something changed."""

    def __init__(
        self,
        config: Callable[[], FinetuneConfig],
        labels: LabelStore,
        samples: SampleStore,
        serving: Serving,
        state: PersonalisationState,
        save: Callable[[], None],
        wake: Callable[[], None],
        enabled: Callable[[], bool],
        *,
        control: HttpPersonalisation | None = None,
        poll_s: float = 3600.0,
        bad_input: RateLimitedLog | None = None,
    ) -> None:
        self._config, self.labels, self.samples, self.serving = config, labels, samples, serving
        self.state, self._save, self._wake, self._enabled = state, save, wake, enabled
        self.control, self.poll_s, self.bad_input = control, poll_s, bad_input
        cfg = config()
        self.recent = RecentResults(cfg.recent_results, cfg.recent_mb << 20)
        self.refused: dict[str, int] = {}
        self._poll = asyncio.Event()
        self._pseudo_busy = False
        self.applying = asyncio.Lock()  # a job exports the labels of whole documents

    def _refuse(self, reason: str, detail: str) -> str:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.bad_input is not None:
            self.bad_input.warn(f"label_{reason}", detail)
        return reason

    async def label(
        self,
        label: str,
        origin: LabelSource,
        *,
        sample_id: str | None = None,
        ref: str | None = None,
        source: str | None = None,
    ) -> str:
        """Store one label; returns "stored" or the reason it was dropped."""
        engine = self.serving.engine
        if label not in engine.labels:
            return self._refuse("unknown_label", f"label {label!r} is not a class of the model")
        found = await self._find(sample_id, ref, source)
        if found is None:
            what = sample_id if sample_id is not None else f"{source or '*'}/{ref}"
            return self._refuse("unknown_sample", f"sample {what} is no longer on the device")
        data, embedding, embedded_on, key = found
        if tuple(data.shape) != engine.sample_shape:
            return self._refuse("unknown_sample", f"sample {key} does not fit the model")
        await self.labels.add(
            Label(key, engine.labels.index(label), origin, data, embedding, embedded_on)
        )
        self._wake()
        return "stored"

    async def _find(
        self, sample_id: str | None, ref: str | None, source: str | None
    ) -> tuple[Any, Any, str | None, str] | None:
        recent: Recent | None = None
        if sample_id is not None:
            recent = self.recent.by_id(sample_id)
            if recent is None:
                kept = await self.samples.get(sample_id)
                if kept is None:
                    return None
                block = self.serving.engine.manifest.block is not None
                origin = embedding_origin(kept.model, block)
                return kept.input, kept.embedding, origin, sample_id
        elif ref is not None:
            recent = self.recent.by_ref(ref, source)
        if recent is None:
            return None
        key = recent.sample_id or f"{recent.source}/{recent.ref}"
        return recent.input, recent.embedding, recent.embedded_on, key

    async def truth(self, payload: bytes) -> None:
        """A local ground-truth message: {"sample_id"| "ref" [+ "source"], "label"}."""
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            self._refuse("malformed", "a truth message is not JSON")
            return
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("label"), str)
            or not any(isinstance(message.get(k), str) for k in ("sample_id", "ref"))
            or not all(isinstance(message.get(k, ""), str) for k in ("sample_id", "ref", "source"))
        ):
            self._refuse("malformed", 'a truth message needs "label" and "sample_id" or "ref"')
            return
        await self.label(
            message["label"],
            "local",
            sample_id=message.get("sample_id"),
            ref=message.get("ref"),
            source=message.get("source"),
        )

    def observe(self, result: Result) -> None:
        """A pipeline sink: very confident results become pseudo-labels when configured."""
        threshold = self._config().pseudo_label_confidence
        if threshold <= 0 or result.confidence < threshold or not self._enabled():
            return
        if self._pseudo_busy:  # one write at a time: a fast stream cannot flood the store
            return
        self._pseudo_busy = True
        task = asyncio.get_running_loop().create_task(
            self.label(result.label, "pseudo", ref=result.ref, source=result.source)
        )
        task.add_done_callback(self._pseudo_done)

    def _pseudo_done(self, task: asyncio.Task[str]) -> None:
        self._pseudo_busy = False
        if not task.cancelled() and task.exception() is not None:
            log_event(log, "error", "pseudo_label_failed", reason=repr(task.exception()))

    # -- the control plane ------------------------------------------------------------------

    def command(self, payload: bytes) -> None:
        """MQTT cmd/personalisation: apply the document it carries, then ask for what was
        missed."""
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            self._refuse("malformed", "a personalisation command is not JSON")
            document = None
        if isinstance(document, dict):
            task = asyncio.get_running_loop().create_task(self.apply(document))
            task.add_done_callback(_log_failure)
        self._poll.set()

    async def apply(self, document: dict[str, Any]) -> None:
        """The control plane's {"enabled", "labels": [{"seq", "sample_id", "label"}], ...}."""
        enabled = document.get("enabled")
        if isinstance(enabled, bool) and enabled != self.state.operator:
            self.state.rebuild = enabled and self.state.operator is False
            self.state.operator = enabled
            self.state.reverted_from = None  # switching off (again) tries a revert again
            self._save()
            log_event(log, "info", "personalisation_switched", enabled=enabled)
            self._wake()
        entries = document.get("labels")
        if not isinstance(entries, list):
            return
        async with self.applying:
            await self._apply_labels(entries)

    async def _apply_labels(self, entries: list[Any]) -> None:
        seen = set(self.state.pending_seqs)
        for entry in entries[:MAX_LABELS_PER_DOCUMENT]:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("seq"), int)
                and isinstance(entry.get("sample_id"), str)
                and isinstance(entry.get("label"), str)
            ):
                self._refuse("malformed", "a cloud label needs seq, sample_id and label")
                continue
            seq = entry["seq"]
            if seq <= self.state.cloud_seq or seq in seen:
                continue  # already applied: labels are idempotent, but don't count twice
            await self.label(entry["label"], "cloud", sample_id=entry["sample_id"])
            seen.add(seq)
        while self.state.cloud_seq + 1 in seen:
            self.state.cloud_seq += 1
            seen.discard(self.state.cloud_seq)
        self.state.pending_seqs = sorted(seen)[-MAX_LABELS_PER_DOCUMENT:]
        self._save()

    async def poll(self) -> None:
        """Ask the control plane for labels after our cursor (and the switch), at start, on
        every cmd/personalisation and every `poll_s`."""
        if self.control is None:
            return
        while True:
            try:
                await self.fetch_missed()
            except EdgedError as exc:
                log.warning("personalisation: %s", exc)
            except Exception:
                log.exception("personalisation poll failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._poll.wait()
            self._poll.clear()

    async def fetch_missed(self) -> None:
        """Page through `GET /v1/device/self/personalisation?after=<cursor>` until caught up."""
        assert self.control is not None
        while True:
            before = self.state.cloud_seq
            document = await asyncio.to_thread(self.control.fetch, before)
            await self.apply(document)
            entries = document.get("labels")
            seqs = (
                [
                    e["seq"]
                    for e in entries or []
                    if isinstance(e, dict) and isinstance(e.get("seq"), int)
                ]
                if isinstance(entries, list)
                else []
            )
            if not seqs or max(seqs) <= before:
                return  # caught up (or an answer that does not move us on)
            if self.state.cloud_seq < max(seqs):  # a gap the control plane cannot fill
                self.state.cloud_seq = max(seqs)
                self.state.pending_seqs = [q for q in self.state.pending_seqs if q > max(seqs)]
                self._save()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log_event(log, "error", "personalisation_failed", reason=repr(task.exception()))
