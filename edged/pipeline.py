"""Samples in, decisions out: the daemon's inference path.

    sources ──submit──► queue (bounded: backpressure) ──► inference thread (batched)
            ──► post-processing on the loop: results to local consumers first, then the gate,
                drift statistics, and the kept samples' writes (local store + outbox)

Inference runs in one worker thread while the loop post-processes the previous batch, so on a
multi-core board the Python work overlaps the interpreter's. Results reach the local bus and
the plug-ins before anything touches a disk, and never wait for the uplink.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edged.atomic import atomic_write
from edged.drift import DriftAlarm, DriftConfig, DriftMonitor
from edged.engine import Engine, Prediction
from edged.gating import AUDIT, CONFIDENT, UNCERTAIN, Gate, GatingConfig
from edged.health import LatencyWindow
from edged.labels import Recent, RecentResults, embedding_origin
from edged.logs import RateLimitedLog, log_event
from edged.outbox import Outbox, OutboxError
from edged.sample_budget import GatingCounters, UploadBudget, signature_of
from edged.sample_store import KeptSample, SampleStore
from edged.sources import Sample

__all__ = ["Pipeline", "Result", "ResultSink"]

log = logging.getLogger(__name__)
VERDICTS = {CONFIDENT: "confident", UNCERTAIN: "uncertain", AUDIT: "audit"}


@dataclass(frozen=True, slots=True)
class Result:
    """What local consumers get for every sample."""

    source: str
    ref: str
    top1: int
    label: str
    confidence: float
    verdict: str
    model: str
    latency_ms: float
    sample_id: str | None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "source": self.source,
                "ref": self.ref,
                "top1": self.top1,
                "label": self.label,
                "confidence": round(self.confidence, 5),
                "verdict": self.verdict,
                "model": self.model,
                "latency_ms": round(self.latency_ms, 3),
                "sample_id": self.sample_id,
            },
            separators=(",", ":"),
        ).encode()


ResultSink = Callable[[Result], None]


UPLOAD_OVERHEAD = 512  # a sample record's keys, id, verdict, model, dtype, shape


def upload_body(sample: Sample, kept: KeptSample) -> dict[str, Any]:
    """The `sample` record a kept sample is uploaded as (docs/wire-format.md)."""
    body: dict[str, Any] = {
        "id": kept.id,
        "source": sample.source,
        "ref": sample.ref,
        "verdict": kept.verdict,
        "model": kept.model,
        "input": np.ascontiguousarray(kept.input).tobytes(),
        "dtype": kept.input.dtype.str,
        "shape": list(kept.input.shape),
        "probabilities": kept.probabilities.tolist(),
    }
    if kept.embedding is not None:
        body["embedding"] = kept.embedding.tolist()
    return body


def upload_size(
    sample: Sample, probabilities: npt.NDArray[Any], embedding: npt.NDArray[Any] | None
) -> int:
    """What `upload_body` costs the daily bytes budget, without encoding it: the raw input,
    the probabilities and embedding as CBOR floats (9 bytes each), source and ref, and at
    most UPLOAD_OVERHEAD for the rest (tests/unit/edged/test_pipeline_upload.py)."""
    floats = probabilities.size + (0 if embedding is None else embedding.size)
    text = len(sample.source.encode()) + len(sample.ref.encode())
    return int(sample.data.nbytes) + 9 * int(floats) + text + UPLOAD_OVERHEAD


@dataclass(slots=True)
class PipelineCounts:
    received: int = 0
    inferred: int = 0
    batches: int = 0
    kept: int = 0
    uploaded: int = 0
    write_failures: int = 0
    per_class: Counter[str] = field(default_factory=Counter)


class Pipeline:
    """`submit` from sources, `run` until cancelled; `drain` before a clean stop."""

    def __init__(
        self,
        engine: Engine,
        *,
        gating: GatingConfig,
        drift: DriftConfig,
        outbox: Outbox,
        store: SampleStore,
        queue_size: int,
        max_pending_writes: int,
        sinks: list[ResultSink],
        bad_input: RateLimitedLog,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        budget_file: Path | None = None,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.store = store
        self.sinks = sinks
        self.bad_input = bad_input
        self.counts = PipelineCounts()
        self.latency = LatencyWindow()
        self.alarms: list[dict[str, Any]] = []
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._gating_config = gating
        self.gating_counts = GatingCounters()
        self.gate = Gate(gating, engine.manifest, engine.labels, self._rng, self.gating_counts)
        self.budget = UploadBudget(gating.budget, clock, self.gating_counts)
        self._budget_file = budget_file
        self._restore_budget()
        self.drift = DriftMonitor(engine.manifest.reference, drift, engine.sample_shape)
        self._queue: asyncio.Queue[Sample] = asyncio.Queue(queue_size)
        self._done: asyncio.Queue[tuple[list[Sample], npt.NDArray[Any], Prediction | Exception]]
        self._done = asyncio.Queue(2)
        self._writes = asyncio.Semaphore(max_pending_writes)
        self._pending: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._dtype = np.dtype(engine.manifest.input.dtype)
        self._next_id = 0
        self.recent: RecentResults | None = None  # what a label can name (edged.labels)
        self.drift_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._backbone = _backbone_of(engine)
        self._busy_since: float | None = None  # when the current invoke started
        self.last_progress = clock()

    # -- intake -----------------------------------------------------------------------------

    def refuse(self, source: str, kind: str, message: str) -> None:
        """Count and (rate-limited) log a bad input; the daemon keeps serving."""
        self.bad_input.warn(kind, message, source=source)

    async def submit(self, sample: Sample) -> None:
        """Check one sample and queue it, waiting while the queue is full."""
        self.counts.received += 1
        problem = self._check(sample)
        if problem is not None:
            kind, message = problem
            self.refuse(sample.source, kind, f"{sample.source} {sample.ref}: {message}")
            if sample.settle is not None:
                sample.settle(kind)
            return
        await self._queue.put(sample)

    def _check(self, sample: Sample) -> tuple[str, str] | None:
        data = sample.data
        if data.shape != self.engine.sample_shape:
            return "wrong_shape", (
                f"shape {list(data.shape)} does not match the model's "
                f"{list(self.engine.sample_shape)}"
            )
        if data.dtype.kind in "iu" and self._dtype.kind in "iu":
            pass  # raw integers (uint8 pixels for an int8 model): the engine's input map folds them
        elif data.dtype != self._dtype:
            if data.dtype.kind not in "iuf" or not np.can_cast(
                data.dtype, self._dtype, "same_kind"
            ):
                return "wrong_dtype", f"dtype {data.dtype} cannot feed a {self._dtype} input"
            sample.data = data.astype(self._dtype)
        if self._dtype.kind == "f" and not np.isfinite(sample.data).all():
            return "not_finite", "input holds NaN or infinite values"
        return None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # -- the two stages ---------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._infer_loop())
            group.create_task(self._post_loop())

    async def _infer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        max_batch = self.engine.options.max_batch
        while True:
            if self._queue.empty():
                self.last_progress = self._clock()
            batch = [await self._queue.get()]
            self.last_progress = self._clock()  # an idle wait is not a stall
            while len(batch) < max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            x = np.stack([s.data for s in batch])
            self._busy_since = self._clock()
            outcome: Prediction | Exception
            try:
                outcome = await loop.run_in_executor(self._executor, self.engine.predict, x)
            except Exception as exc:  # an input the runtime refuses must not stop the loop
                outcome = exc
            self._busy_since = None
            self.last_progress = self._clock()
            await self._done.put((batch, x, outcome))

    def stalled_for(self) -> float:
        """How long the pipeline has been stuck: the current invoke's time, or, while samples
        wait (in the queue, or inferred and waiting for the post stage), the time since
        anything moved (a batch went in or came out, a kept sample got its write slot): a
        post stage wedged on a write holds inference behind it. 0 when idle."""
        now = self._clock()
        if self._busy_since is not None:
            return now - self._busy_since
        if self._queue.empty() and self._done.empty():
            return 0.0
        return now - self.last_progress

    async def _post_loop(self) -> None:
        while True:
            batch, x, outcome = await self._done.get()
            try:
                if isinstance(outcome, Exception):
                    for sample in batch:
                        self.refuse(sample.source, "inference", f"inference failed: {outcome}")
                        if sample.settle is not None:
                            sample.settle("inference")
                else:
                    await self._handle(batch, x, outcome)
            finally:
                self._done.task_done()

    async def _handle(
        self, batch: list[Sample], x: npt.NDArray[Any], prediction: Prediction
    ) -> None:
        finite = np.all(np.isfinite(prediction.probabilities), axis=1, keepdims=False)
        if not finite.all():  # a finite input the model overflows on (a float model)
            usable = [bool(ok) for ok in finite]
            for sample in (s for s, ok in zip(batch, usable, strict=True) if not ok):
                message = f"{sample.source} {sample.ref}: the model's output is NaN or infinite"
                self.refuse(sample.source, "not_finite_output", message)
                if sample.settle is not None:
                    sample.settle("not_finite_output")
            if not finite.any():
                return
            batch = [s for s, ok in zip(batch, usable, strict=True) if ok]
            x = x[finite]
            embeddings = prediction.embeddings
            prediction = replace(
                prediction,
                probabilities=prediction.probabilities[finite],
                embeddings=None if embeddings is None else embeddings[finite],
            )
        n = len(batch)
        self.counts.inferred += n
        self.counts.batches += 1
        now = time.monotonic()
        waited = [now - s.received for s in batch]  # queueing + inference, per sample
        self.latency.add_many(waited)
        decision = self.gate.decide(prediction.probabilities)
        labels = self.engine.labels
        top1 = decision.top1.tolist()
        confidence = prediction.confidence.tolist()
        verdicts = decision.verdicts.tolist()
        keep = [i for i, v in enumerate(verdicts) if v != CONFIDENT]
        ids = {i: self._sample_id() for i in keep}
        for i, sample in enumerate(batch):
            self.counts.per_class[labels[top1[i]]] += 1
            if self.recent is not None:
                embedding = None if prediction.embeddings is None else prediction.embeddings[i]
                self.recent.add(
                    Recent(
                        ids.get(i),
                        sample.source,
                        sample.ref,
                        sample.data,
                        embedding,
                        self._backbone,
                        top1[i],
                        confidence[i],
                    )
                )
            result = Result(
                sample.source,
                sample.ref,
                top1[i],
                labels[top1[i]],
                confidence[i],
                VERDICTS[verdicts[i]],
                prediction.model_version,
                waited[i] * 1000,
                ids.get(i),
            )
            for sink in self.sinks:
                try:
                    sink(result)
                except Exception as exc:  # a consumer's bug must not stop inference
                    self.refuse(sample.source, "sink", f"result consumer failed: {exc!r}")
        for alarm in self.drift.observe(x, prediction.confidence):
            self._raise_alarm(alarm, prediction.model_version)
        for i, sample in enumerate(batch):
            if i in ids:
                await self._keep(sample, prediction, i, top1[i], ids[i], verdicts[i])
            elif sample.settle is not None:
                sample.settle(None)

    def _sample_id(self) -> str:
        self._next_id += 1
        return f"{self.outbox.boot:x}-{self._next_id:x}"

    # -- kept samples -----------------------------------------------------------------------

    def _restore_budget(self) -> None:
        """The upload budget's spending as the last run left it (`budget_file`), refilled by
        the wall-clock time since: a daemon restarting in a loop gets no fresh allowance."""
        if self._budget_file is None:
            return
        try:
            saved = json.loads(self._budget_file.read_text())
            self.budget.restore(saved["spent"], time.time() - float(saved["saved_at"]))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log_event(log, logging.WARNING, "budget_not_restored", reason=repr(exc)[:200])

    def _save_budget(self, spent: dict[str, Any]) -> None:
        assert self._budget_file is not None
        data = json.dumps({"saved_at": time.time(), "spent": spent}).encode()
        try:
            atomic_write(self._budget_file, data, 0o600)
        except OSError as exc:  # the budget holds in memory; only a restart would forget it
            log_event(log, logging.WARNING, "budget_not_saved", reason=str(exc)[:200])

    async def _keep(
        self,
        sample: Sample,
        prediction: Prediction,
        i: int,
        top1: int,
        sample_id: str,
        verdict: int,
    ) -> None:
        embedding = None if prediction.embeddings is None else prediction.embeddings[i]
        signature = signature_of(sample.data, embedding)
        size = upload_size(sample, prediction.probabilities[i], embedding)
        refusal = self.budget.admit(top1, size, signature, audit=verdict == AUDIT)
        if refusal is None and self._budget_file is not None:
            await asyncio.to_thread(self._save_budget, self.budget.spent())
        if refusal == "duplicate":
            if sample.settle is not None:
                sample.settle(None)
            return
        kept = KeptSample(
            sample_id,
            time.time(),
            prediction.model_version,
            VERDICTS[verdict],
            top1,
            sample.data,
            prediction.probabilities[i],
            embedding,
        )
        await self._writes.acquire()
        self.last_progress = self._clock()  # a write slot came free: the post stage moves
        task = asyncio.create_task(self._write(sample, kept, upload=refusal is None))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, sample: Sample, kept: KeptSample, *, upload: bool) -> None:
        """Store (and queue) a kept sample; the sample settles only after, as `write` when
        that failed, so its source keeps the input (the spool's rejected/) rather than
        forgetting a sample gating meant to keep."""
        problem: str | None = None
        try:
            await self.store.add(kept)
            self.counts.kept += 1
            if upload:
                await self.outbox.put("sample", upload_body(sample, kept))
                self.counts.uploaded += 1
        except (OutboxError, OSError) as exc:
            problem = "write"
            self.counts.write_failures += 1
            self.refuse(sample.source, "write", f"kept sample {kept.id} not stored: {exc}")
        except Exception as exc:  # sqlite3 errors from the store; counted, never fatal
            problem = "write"
            self.counts.write_failures += 1
            self.refuse(sample.source, "write", f"kept sample {kept.id} not stored: {exc!r}")
        finally:
            self._writes.release()
            if sample.settle is not None:
                sample.settle(problem)

    # -- drift --------------------------------------------------------------------------------

    def _raise_alarm(self, alarm: DriftAlarm, model: str) -> None:
        detail = {
            "kind": alarm.kind,
            "score": round(float(alarm.score), 5),
            "threshold": alarm.threshold,
            "samples": alarm.samples,
            "model": model,
        }
        self.alarms.append(detail)
        del self.alarms[:-16]
        for listener in self.drift_listeners:
            listener(detail)
        log_event(log, logging.WARNING, "drift", **detail)
        task = asyncio.create_task(self._put_event("drift", detail))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put_event(self, name: str, detail: dict[str, Any]) -> None:
        try:
            await self.outbox.put("event", {"name": name, **detail})
        except OutboxError as exc:
            log.error("event %s not stored: %s", name, exc)

    # -- reconfiguration and stop -----------------------------------------------------------

    def reconfigure(self, gating: GatingConfig, drift: DriftConfig) -> None:
        """New thresholds and budgets from a reload; spent budgets and drift windows stay.
        ValueError (a per-class label the model lacks, a quantile the bundle lacks) changes
        nothing."""
        manifest, labels = self.engine.manifest, self.engine.labels
        self.gate = Gate(gating, manifest, labels, self._rng, self.gating_counts)
        self.budget.reconfigure(gating.budget)
        self.drift.reconfigure(drift)
        self._gating_config = gating

    def model_swapped(self) -> None:
        """A new model: thresholds from its reference statistics, drift against them."""
        manifest = self.engine.manifest
        self.gate = Gate(
            self._gating_config, manifest, self.engine.labels, self._rng, self.gating_counts
        )
        self.drift.reset(manifest.reference, self.engine.sample_shape)
        self._dtype = np.dtype(manifest.input.dtype)
        self._backbone = _backbone_of(self.engine)

    async def drain(self) -> None:
        """Wait until every queued sample is processed and every kept copy written."""
        while not self._queue.empty() or self._done.qsize() or self._busy_since is not None:
            await asyncio.sleep(0.01)
        await self._done.join()
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _backbone_of(engine: Engine) -> str:
    """The version whose backbone computes this model's embeddings (embedding_origin)."""
    return embedding_origin(engine.manifest.version, engine.manifest.block is not None)
