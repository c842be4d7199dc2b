"""The pipeline in-process with a real model, a real outbox and a real sample store."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edged.drift import DriftConfig
from edged.engine import Engine
from edged.gating import GatingConfig
from edged.logs import RateLimitedLog
from edged.outbox import Outbox, OutboxConfig
from edged.pipeline import Pipeline, Result
from edged.sample_store import SampleStore
from edged.sources import Sample


def make_pipeline(engine: Engine, outbox: Outbox, store: SampleStore, **overrides: Any) -> Pipeline:
    """A pipeline on the test's outbox and store: default gating and drift, a queue of 8,
    8 pending writes, no sinks, unless `overrides` say otherwise."""
    options: dict[str, Any] = {
        "gating": GatingConfig(),
        "drift": DriftConfig(),
        "queue_size": 8,
        "max_pending_writes": 8,
        "sinks": [],
        "bad_input": RateLimitedLog(logging.getLogger("test")),
    }
    return Pipeline(engine, outbox=outbox, store=store, **(options | overrides))


async def feed(pipeline: Pipeline, samples: dict[str, Any], settled: dict[str, Any]) -> bool:
    """Run `pipeline` over `samples` (ref -> array), each settling into `settled[ref]`, until
    drained; whether it was still running then."""
    runner = asyncio.create_task(pipeline.run())
    for ref, data in samples.items():
        await pipeline.submit(
            Sample("t", ref, data, lambda p, ref=ref: settled.__setitem__(ref, p))
        )
    await pipeline.drain()
    alive = not runner.done()
    runner.cancel()
    pipeline.close()
    return alive


async def test_backpressure_bounds_the_queue_and_every_sample_settles(
    tmp_path: Path, digits_build
) -> None:
    """A source faster than inference waits at a queue of 4: the queue never grows past it,
    every sample is settled once, and each kept sample is in the store and the outbox."""
    out, report = digits_build
    engine = Engine.from_file(out / report.bundle)
    x = np.load(out / "digits-test.npz")["x"]
    results: list[Result] = []
    settled: dict[str, list[str | None]] = {}
    async with (
        Outbox(OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0)) as outbox,
        SampleStore(tmp_path / "samples.db") as store,
    ):
        pipeline = make_pipeline(
            engine,
            outbox,
            store,
            gating=GatingConfig(threshold=0.99),
            queue_size=4,
            sinks=[results.append],
            seed=1,
        )
        runner = asyncio.create_task(pipeline.run())
        depths: list[int] = []

        def settle_of(ref: str):
            return lambda problem: settled.setdefault(ref, []).append(problem)

        for i, sample in enumerate(x):
            await pipeline.submit(Sample("fast", str(i), sample, settle_of(str(i))))
            depths.append(pipeline.depth)
        await pipeline.drain()
        runner.cancel()
        pipeline.close()
        stats = outbox.stats()
        assert max(depths) <= 4
        assert settled == {str(i): [None] for i in range(len(x))}
        assert len(results) == len(x)
        assert pipeline.counts.batches < len(x)  # waiting samples were batched
        kept = [r for r in results if r.sample_id is not None]
        assert pipeline.counts.kept == store.count > 0
        assert stats.by_class["sample"].enqueued == pipeline.counts.uploaded
        stored = await store.get(kept[0].sample_id or "")
        assert stored is not None
        np.testing.assert_array_equal(stored.input, x[int(kept[0].ref)])
        assert stored.probabilities.shape == (10,)


async def test_bad_samples_are_settled_with_their_kind(tmp_path: Path, tf_bundles) -> None:
    """On a float model, NaN and wrong-shape samples are refused with their kind and counted,
    an int sample is cast and served, a finite input the model overflows on (NaN output) is
    refused after inference, and good samples around them are served."""
    engine = Engine.from_file(tf_bundles["digits_float"])
    shape = engine.sample_shape
    settled: dict[str, str | None] = {}
    bad_input = RateLimitedLog(logging.getLogger("test"))
    async with (
        Outbox(OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0)) as outbox,
        SampleStore(tmp_path / "samples.db") as store,
    ):
        pipeline = make_pipeline(engine, outbox, store, bad_input=bad_input)
        nan = np.full(shape, np.nan, np.float32)
        samples = {
            "good": np.zeros(shape, np.float32),
            "nan": nan,
            "shape": np.zeros((3, 3), np.float32),
            "int": np.zeros(shape, np.int16),
            "complex": np.zeros(shape, np.complex64),
            "overflow": np.full(shape, 3e38, np.float32),
            "after": np.ones(shape, np.float32),
        }
        alive = await feed(pipeline, samples, settled)
    assert alive
    assert settled == {
        "good": None,
        "nan": "not_finite",
        "shape": "wrong_shape",
        "int": None,
        "complex": "wrong_dtype",
        "overflow": "not_finite_output",
        "after": None,
    }
    assert bad_input.counts() == {
        "not_finite": 1,
        "wrong_shape": 1,
        "wrong_dtype": 1,
        "not_finite_output": 1,
    }
    assert pipeline.counts.inferred == 3
    assert pipeline.drift.samples == 3


async def test_a_kept_sample_that_cannot_be_stored_settles_as_a_write_failure(
    tmp_path: Path, digits_build
) -> None:
    """When the sample store refuses a write (here its table is gone, dropped by another
    connection), the samples gating kept settle as `write`, so their source keeps the input
    (the spool's rejected/) instead of forgetting it; the confident ones settle as processed
    and the daemon keeps serving. (Every sample settled as processed before.)"""
    import sqlite3

    out, report = digits_build
    engine = Engine.from_file(out / report.bundle)
    x = np.load(out / "digits-test.npz")["x"][:40]
    settled: dict[str, str | None] = {}
    results: list[Result] = []
    bad_input = RateLimitedLog(logging.getLogger("test"))
    async with (
        Outbox(OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0)) as outbox,
        SampleStore(tmp_path / "samples.db") as store,
    ):
        with sqlite3.connect(tmp_path / "samples.db") as other:
            other.execute("DROP TABLE samples")
        other.close()
        pipeline = make_pipeline(
            engine,
            outbox,
            store,
            gating=GatingConfig(threshold=0.99),
            sinks=[results.append],
            bad_input=bad_input,
            seed=1,
        )
        alive = await feed(pipeline, {str(i): sample for i, sample in enumerate(x)}, settled)
    kept = {r.ref for r in results if r.sample_id is not None}
    assert alive and kept and len(results) == len(x)
    assert {ref for ref, problem in settled.items() if problem == "write"} == kept
    assert all(settled[r.ref] is None for r in results if r.ref not in kept)
    assert pipeline.counts.write_failures == len(kept) and pipeline.counts.kept == 0
    assert bad_input.counts() == {"write": len(kept)}


async def test_the_upload_budget_survives_a_restart(tmp_path: Path, digits_build) -> None:
    """samples_per_hour = 3: the first run uploads 3 of its uncertain samples; a second
    pipeline on the same state file (a restart, seconds later) uploads none, where it
    uploaded 3 again before (the buckets started full at every start)."""
    from edged.sample_budget import UploadBudgetConfig

    out, report = digits_build
    engine = Engine.from_file(out / report.bundle)
    x = np.load(out / "digits-test.npz")["x"][:60]
    gating = GatingConfig(
        threshold=0.999,
        audit_rate=0.0,
        budget=UploadBudgetConfig(samples_per_hour=3, audit_per_hour=0, dedup_window=0),
    )
    uploaded = []
    for run in range(2):
        async with (
            Outbox(OutboxConfig(tmp_path / "outbox.db", min_free_bytes=0)) as outbox,
            SampleStore(tmp_path / "samples.db") as store,
        ):
            pipeline = make_pipeline(
                engine,
                outbox,
                store,
                gating=gating,
                seed=run,
                budget_file=tmp_path / "gating-budget.json",
            )
            await feed(pipeline, {str(i): sample for i, sample in enumerate(x)}, {})
        assert pipeline.counts.kept > 3
        uploaded.append(pipeline.counts.uploaded)
    assert uploaded == [3, 0]
