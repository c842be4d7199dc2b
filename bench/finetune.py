"""Fine-tuning benchmark (docs/finetune.md): what the device's worker recovers from N labels,
and what it costs the inference that keeps running meanwhile.

Value: inference p99 latency (ms) of the digits model while a fine-tune worker runs. Baseline:
the p99 of the same loop while no worker runs, measured in the same run, in windows interleaved
with the worker's (idle, worker, idle, worker, ...). The loop is the daemon's engine
(`edged.engine.Engine`, 1 thread) predicting one raw sample at a time back to back, in this
process; the worker is the real one, started as the daemon starts it
(`python -m edged.finetune.launch --nice 19 --memory-mb 2048 --threads 1 JOB_DIR`) on a job of
300 labelled rotated digits. The figure is the median over `ROUNDS` pairs of each window's p99.

Recovery (`recovered_*`): the reference digits model meets digits rotated by 25°; N labelled
rotated samples (drawn from the training and validation splits, `DRAWS` seeded draws per N)
go through the worker's own steps in this process with its default (`train = "auto"`: the
reference bundle allows its last block, so the block producing the embedding and the head are
trained): the hold-out split of the job (the device trains on the labels outside its 25 %
hold-out, so N labels train on about 0.75 N), the block's inputs read on the base through
LiteRT, L-BFGS from the base's block and head with the bundle's replay set (the job's default
anchors), export to int8 in place (the embedding re-calibrated); the candidate's accuracy on
the held-out rotated test split, then share = (after - drifted) / (clean - drifted), where clean
is the base model's accuracy on the upright test split and drifted on the rotated one.
`forgetting_pts` is the change of accuracy on the upright test split at N = 300, in points
(target >= -2). `recovered_all_*` trains on all N labels (no hold-out), for comparison.
`head_recovered_*` and `head_upright_change_pts_*` are the same with `train = "head"` (the
classifier head alone, on the frozen embedding), for comparison.
`verdict_*` is the real worker's gate verdict on the first draw of each N (`trained_*`: what
it trained).
`probe_300` / `probe_all`: the ceiling of any head on this embedding, as recovery shares: a
scikit-learn logistic regression (C = 1) fitted to the frozen embeddings of 300 rotated digits
(first draw) or of all of them, plus every upright training digit, scored on the rotated test
split.

`worker_s` is the real worker's wall time on the 300-label job (process start to exit, median
of the rounds), `worker_peak_mb` its peak RSS (VmHWM, as it reports it).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from bench.common import Result, conditions, median, percentile
from edged.finetune.launch import worker_command

if TYPE_CHECKING:
    from edged.finetune.job import Train

__all__ = ["run"]

# (what the worker trains, whether 25 % is held out for the gate)
VARIANTS: tuple[tuple[Train, bool], ...] = (("auto", True), ("auto", False), ("head", True))

DEGREES = 25
SIZES = (50, 100, 300)
DRAWS = 3
ROUNDS = 5
TARGETS = {
    "recovered": "recovered >= 0.90",
    "forgetting_pts": "forgetting_pts >= -2",
}


def run() -> Result:
    from bench.pipeline import _digits
    from control_plane.toolchain.datasets import digits_dataset, rotated
    from edged.engine import Engine, EngineOptions
    from edged_formats import read_bundle

    bundle_path = _digits().bundle
    base_bytes = bundle_path.read_bytes()
    base = read_bundle(base_bytes)
    data = digits_dataset()
    pool_x = rotated(np.concatenate([data.x_train, data.x_val]), DEGREES)
    pool_y = np.concatenate([data.y_train, data.y_val])
    test_rotated = rotated(data.x_test, DEGREES)
    engine = Engine(base, EngineOptions())
    clean = _accuracy(engine, data.x_test, data.y_test)
    drifted = _accuracy(engine, test_rotated, data.y_test)
    metrics: dict[str, Any] = {"clean_accuracy": clean, "drifted_accuracy": drifted}
    with tempfile.TemporaryDirectory(prefix="edged-bench-ft-") as tmp:
        work = Path(tmp)
        base_file = work / "base.edb"
        base_file.write_bytes(base_bytes)
        for n in SIZES:
            shares: dict[tuple[str, bool], list[float]] = {}
            upright: dict[str, list[float]] = {}
            for draw in range(DRAWS):
                rng = np.random.default_rng(1000 * n + draw)
                pick = rng.choice(len(pool_x), n, replace=False)
                keys = [f"s{draw}-{i}" for i in pick]
                for train, holdout in VARIANTS:
                    candidate = _candidate(base, pool_x[pick], pool_y[pick], keys, holdout, train)
                    after = _accuracy(candidate, test_rotated, data.y_test)
                    shares.setdefault((train, holdout), []).append(
                        (after - drifted) / (clean - drifted)
                    )
                    if holdout:
                        upright.setdefault(train, []).append(
                            _accuracy(candidate, data.x_test, data.y_test) - clean
                        )
                if draw == 0:
                    job = _job(work / f"job-{n}", base_file, pool_x[pick], pool_y[pick], keys)
                    verdict, _, _ = _run_worker(job)
                    metrics[f"verdict_{n}"] = verdict["verdict"]
                    metrics[f"reason_{n}"] = verdict["reason"]
                    metrics[f"trained_{n}"] = verdict.get("trained")
            metrics[f"recovered_{n}"] = round(float(np.mean(shares["auto", True])), 4)
            metrics[f"recovered_all_{n}"] = round(float(np.mean(shares["auto", False])), 4)
            metrics[f"upright_change_pts_{n}"] = round(100 * float(np.mean(upright["auto"])), 2)
            metrics[f"head_recovered_{n}"] = round(float(np.mean(shares["head", True])), 4)
            metrics[f"head_upright_change_pts_{n}"] = round(
                100 * float(np.mean(upright["head"])), 2
            )
        metrics |= _probe(engine, pool_x, pool_y, data, test_rotated, clean, drifted)
        metrics["recovered"] = metrics["recovered_300"]
        metrics["forgetting_pts"] = metrics["upright_change_pts_300"]
        rng = np.random.default_rng(7)
        pick = rng.choice(len(pool_x), 300, replace=False)
        job = _job(
            work / "job-latency", base_file, pool_x[pick], pool_y[pick], [str(i) for i in pick]
        )
        idle, busy, walls, peaks = _latency(engine, data.x_test, job)
    metrics |= {
        "worker_s": round(median(walls), 2),
        "worker_peak_mb": round(median(peaks), 1),
        "idle_p99_ms_rounds": [round(v, 4) for v in idle],
        "busy_p99_ms_rounds": [round(v, 4) for v in busy],
    }
    return Result(
        name="finetune",
        value=round(median(busy), 4),
        unit="ms (p99 per inference)",
        baseline=round(median(idle), 4),
        baseline_is="the same inference loop's p99 in interleaved windows with no worker running",
        target="ratio <= 1.3",
        metrics=metrics,
        targets=TARGETS,
        conditions=conditions(
            model="digits-cnn (reference build), 1 inference thread",
            drift=f"digits rotated by {DEGREES} degrees",
            draws=DRAWS,
            rounds=ROUNDS,
            worker="nice 19, idle I/O, 1 thread, 2048 MB address space",
        ),
    )


def _probe(
    engine: Any, pool_x: Any, pool_y: Any, data: Any, test_x: Any, clean: float, drifted: float
) -> dict[str, float]:
    """What the best linear head on the frozen embedding recovers (see the module doc)."""
    from sklearn.linear_model import LogisticRegression

    pool, test = engine.predict(pool_x).embeddings, engine.predict(test_x).embeddings
    upright = engine.predict(data.x_train).embeddings
    pick = np.random.default_rng(1000 * 300).choice(len(pool_x), 300, replace=False)
    figures = {}
    for name, rows in (("probe_300", pick), ("probe_all", np.arange(len(pool_x)))):
        x = np.concatenate([pool[rows], upright])
        y = np.concatenate([pool_y[rows], data.y_train])
        fitted = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
        accuracy = float(fitted.score(test, data.y_test))
        figures[name] = round((accuracy - drifted) / (clean - drifted), 4)
    return figures


def _accuracy(engine: Any, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> float:
    return round(float(np.mean(engine.predict(x).top1 == y)), 4)


def _candidate(
    base: Any,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    keys: list[str],
    holdout: bool,
    train: Train,
) -> Any:
    """The worker's steps 1-4 in this process (its own functions, the job's defaults):
    features, split, L-BFGS, int8 export."""
    from edged.engine import Engine, EngineOptions
    from edged.finetune.export import head_updated_bundle
    from edged.finetune.job import Job, JobLabels
    from edged.finetune.split import holdout_mask
    from edged.finetune.worker import _block_op, _features, _Samples, _train, _what_to_train
    from edged_formats import read_bundle

    engine = Engine(base, EngineOptions())
    job = Job(base="base", base_sha256="0" * 64, current="base", version="1", train=train)
    chosen = ~holdout_mask(keys, 0.25) if holdout else np.ones(len(keys), bool)
    replay = base.replay()
    assert replay is not None, "the reference digits bundle ships a replay set"
    labels = JobLabels(
        keys=np.array(keys, dtype=str)[chosen],
        x=x[chosen],
        y=y[chosen].astype(np.int64),
        embeddings=np.zeros((int(chosen.sum()), 0), np.float32),
        embedded=np.zeros(int(chosen.sum()), bool),
    )
    block_op = _block_op(base) if _what_to_train(job, base) == "block" else None
    features, replay_features = _features(base, engine, block_op, labels, replay[0], 1)
    fit = _train(
        job,
        base,
        block_op,
        _Samples(labels.x, labels.y, features),
        _Samples(replay[0], replay[1], replay_features),
    )
    calibration = np.concatenate([replay[0], labels.x])
    candidate = head_updated_bundle(base, fit.weight, fit.bias, calibration, block=fit.block)
    return Engine(read_bundle(candidate), EngineOptions())


def _job(
    job_dir: Path, base: Path, x: npt.NDArray[Any], y: npt.NDArray[Any], keys: list[str]
) -> Path:
    from edged.finetune.job import Job, JobLabels, write_job

    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    job = Job(base=str(base), base_sha256=sha, current=str(base), version="1.0.0+local.1")
    labels = JobLabels(
        keys=np.array(keys, dtype=str),
        x=x,
        y=y.astype(np.int64),
        embeddings=np.zeros((len(keys), 64), np.float32),
        embedded=np.zeros(len(keys), bool),
    )
    write_job(job_dir, job, labels)
    return job_dir


def _run_worker(job_dir: Path) -> tuple[dict[str, Any], float, subprocess.Popen[bytes]]:
    started = time.monotonic()
    process = subprocess.Popen(
        worker_command(job_dir, nice=19, memory_mb=2048, threads=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    process.wait()
    wall = time.monotonic() - started
    return json.loads((job_dir / "result.json").read_text()), wall, process


def _latency(
    engine: Any, samples: npt.NDArray[Any], job: Path
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per-round p99 of one-sample inference, idle and while a worker runs (interleaved)."""
    idle, busy, walls, peaks = [], [], [], []
    for _ in range(ROUNDS):
        outcome: dict[str, Any] = {}
        worker = threading.Thread(target=_worker_into, args=(job, outcome))
        worker.start()
        during = _loop(engine, samples, until=_ended(worker))
        worker.join()
        walls.append(outcome["wall"])
        peaks.append(float(outcome["result"].get("peak_rss_mb") or 0.0))
        quiet = _loop(engine, samples, until=_after(outcome["wall"]))
        busy.append(percentile(during, 99))
        idle.append(percentile(quiet, 99))
    return idle, busy, walls, peaks


def _worker_into(job: Path, outcome: dict[str, Any]) -> None:
    result, wall, _ = _run_worker(job)
    outcome.update(result=result, wall=wall)


def _ended(thread: threading.Thread) -> Any:
    return lambda: not thread.is_alive()


def _after(seconds: float) -> Any:
    stop = time.monotonic() + seconds
    return lambda: time.monotonic() >= stop


def _loop(engine: Any, samples: npt.NDArray[Any], until: Any) -> list[float]:
    latencies: list[float] = []
    i = 0
    while not until():
        sample = samples[i % len(samples)][None]
        start = time.perf_counter()
        engine.predict(sample)
        latencies.append((time.perf_counter() - start) * 1000)
        i += 1
    return latencies
