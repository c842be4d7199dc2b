"""The fine-tune worker: `python -m edged.finetune.worker JOB_DIR` (docs/finetune.md).

Reads job.json and labels.npz, embeds on the base with LiteRT (or reads the last block's inputs
there, when the bundle allows the block to be trained and the job does not ask for the head
alone), splits by key, trains the head, or the block and the head, from the base (torch,
imported here only after the thread count is set), exports the candidate through
`head_updated_bundle`, gates it on the exported int8 model, and writes
`result.json` last; with `accepted` first `candidate.edb` and `head_delta.npz`. Every file is
written atomically, so a `kill -9` at any moment leaves no half-written output.

Exit status: 0 with a result `accepted` or `rejected`; 2 with a result `failed` (the error's
sentence as its reason); 3 when not even that result could be written.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edged.atomic import atomic_write
from edged.engine import Engine, EngineOptions, open_bundle
from edged.errors import EdgedError, ModelError
from edged.finetune.activations import tensor_values
from edged.finetune.gate import GateFigures, Verdict, check_holdout_size, decide
from edged.finetune.head_patch import (
    FullyConnected,
    check_changed_only,
    read_block,
    read_head,
    trainable_outputs,
)
from edged.finetune.job import (
    CANDIDATE_FILE,
    HEAD_DELTA_FILE,
    RESULT_FILE,
    Job,
    JobError,
    JobLabels,
    Result,
    read_job,
    read_labels,
    write_result,
)
from edged.finetune.split import holdout_mask
from edged.ota.slots import fault_point
from edged_formats import Bundle, FormatError, Personalisation, read_bundle
from edged_formats.bundle import dump_npz

__all__ = ["main", "run"]

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class _Rejected(Exception):
    """The job cannot yield a candidate worth gating; the message is the result's reason."""


@dataclass(frozen=True)
class _Samples:
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]
    features: npt.NDArray[np.float32]  # what the trained part reads: embeddings or block inputs


def main(argv: list[str] | None = None) -> int:
    """Run the job in argv's one JOB_DIR and return the exit status."""
    started = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edged.finetune.worker JOB_DIR", file=sys.stderr)
        return 3
    job_dir = Path(args[0])
    version: str | None = None
    try:
        for stale in (RESULT_FILE, CANDIDATE_FILE, HEAD_DELTA_FILE):
            (job_dir / stale).unlink(missing_ok=True)
        job = read_job(job_dir)
        version = job.version
        for variable in _THREAD_VARIABLES:  # before torch (and its OpenMP) is imported
            os.environ[variable] = str(job.threads)
        result, status = run(job_dir, job), 0
    except Exception as exc:  # every error becomes the failed result's sentence
        result, status = Result("failed", _sentence(exc), version=version), 2
    result = replace(result, wall_s=round(time.monotonic() - started, 3), peak_rss_mb=_peak_rss())
    try:
        write_result(job_dir, result)
    except Exception as exc:
        print(f"edged.finetune.worker: cannot write the result ({_sentence(exc)})", file=sys.stderr)
        return 3
    return status


def run(job_dir: Path, job: Job) -> Result:
    """Steps 1-5 of the job; the verdict (accepted or rejected) as a Result, having written
    candidate.edb and head_delta.npz when accepted. Raises on any error."""
    counts: dict[str, Any] = {"version": job.version}
    try:
        return _run(job_dir, job, counts)
    except _Rejected as exc:
        return Result("rejected", str(exc), **counts)


def _run(job_dir: Path, job: Job, counts: dict[str, Any]) -> Result:
    # 1. Bundles, labels, features on the base: embeddings for the head, the block's inputs.
    base, base_sha256 = _load(job.base)
    if base_sha256 != job.base_sha256:
        raise JobError(
            f"the base bundle's sha256 is {base_sha256}, the job names {job.base_sha256}"
        )
    current = base if Path(job.current) == Path(job.base) else open_bundle(job.current)
    labels = read_labels(job_dir)
    counts["labels"] = len(labels)
    manifest = base.manifest
    if manifest.embedding is None:
        raise _Rejected("the base bundle names no embedding output, so its head cannot be trained")
    replay = base.replay()
    if replay is None:
        raise _Rejected(
            "the bundle ships no replay set, so nothing could show the candidate forgets"
        )
    _check_labels(labels, base)
    trained = _what_to_train(job, base)
    counts["trained"] = trained
    options = EngineOptions(num_threads=job.threads)
    base_engine = Engine(base, options)
    block_op = _block_op(base) if trained == "block" else None
    features, replay_features = _features(
        base, base_engine, block_op, labels, replay[0], job.threads
    )
    replay_set = _Samples(replay[0], replay[1], replay_features)
    counts["replay"] = len(replay_set.y)
    fault_point("finetune_embedded")

    # 2. Split.
    held = holdout_mask(labels.keys.tolist(), job.holdout_share)
    holdout = _Samples(labels.x[held], labels.y[held], features[held])
    train = _Samples(labels.x[~held], labels.y[~held], features[~held])
    counts["holdout"], counts["train"] = len(holdout.y), len(train.y)
    too_few = check_holdout_size(job.policy, len(holdout.y))
    if too_few is not None:
        raise _Rejected(too_few.reason)
    if len(train.y) == 0:
        raise _Rejected("every label fell in the hold-out, none is left to train on")

    # 3. Train from the base weights on the training labels and the replay set.
    fit = _train(job, base, block_op, train, replay_set)

    fault_point("finetune_trained")

    # 4. Export.
    from edged.finetune.export import head_updated_bundle

    lineage = Personalisation(manifest.version, base_sha256, len(labels), job.device)
    calibration = np.concatenate([replay_set.x, train.x]).astype(replay_set.x.dtype)
    candidate_bytes = head_updated_bundle(
        base,
        fit.weight,
        fit.bias,
        calibration,
        job.version,
        personalisation=lineage,
        block=fit.block,
    )
    candidate = read_bundle(candidate_bytes)
    check_changed_only(base.model, candidate.model, trainable_outputs(manifest))

    # 5. Gate on the exported int8 model.
    current_engine = base_engine if current is base else Engine(current, options)
    verdict = _gate(
        job, Engine(candidate, options), current_engine, base_engine, holdout, replay_set, counts
    )
    if not verdict.accepted:
        raise _Rejected(verdict.reason)
    atomic_write(job_dir / CANDIDATE_FILE, candidate_bytes)
    atomic_write(job_dir / HEAD_DELTA_FILE, dump_npz(False, **fit.deltas))
    fault_point("finetune_gated")  # the candidate is written, the result not yet
    return Result("accepted", verdict.reason, **counts)


@dataclass(frozen=True)
class _Fit:
    """The trained head, the trained block (or None), and the deltas from the base weights
    (head_delta.npz)."""

    weight: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]
    block: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None
    deltas: dict[str, npt.NDArray[np.float32]]


def _train(
    job: Job,
    base: Bundle,
    block_op: FullyConnected | None,
    train: _Samples,
    replay_set: _Samples,
) -> _Fit:
    """Step 3: the head (or the block and the head) from the base's weights."""
    from edged.finetune.train import train_block, train_head  # torch, after the thread variables

    shipped = base.head_weights()
    weight0, bias0 = shipped or read_head(base.model, base.manifest.output.name).dequantised()
    x = np.concatenate([train.features, replay_set.features])
    y = np.concatenate([train.y, replay_set.y])
    if block_op is None:
        head = train_head(
            x,
            y,
            weight0,
            bias0,
            anchor=job.anchor,
            max_iter=job.max_iter,
            threads=job.threads,
            seed=job.seed,
        )
        deltas = {"weight": head.weight - weight0, "bias": head.bias - bias0}
        return _Fit(head.weight, head.bias, None, _float32(deltas))
    block0 = base.block_weights() or block_op.dequantised()
    fit = train_block(
        x,
        y,
        block0,
        (weight0, bias0),
        activation=block_op.activation,
        anchor=job.anchor,
        block_anchor=job.block_anchor,
        max_iter=job.max_iter,
        threads=job.threads,
        seed=job.seed,
    )
    deltas = {
        "weight": fit.weight - weight0,
        "bias": fit.bias - bias0,
        "block_weight": fit.block_weight - block0[0],
        "block_bias": fit.block_bias - block0[1],
    }
    return _Fit(fit.weight, fit.bias, (fit.block_weight, fit.block_bias), _float32(deltas))


def _float32(arrays: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[np.float32]]:
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _features(
    base: Bundle,
    engine: Engine,
    block_op: FullyConnected | None,
    labels: JobLabels,
    replay_x: npt.NDArray[Any],
    threads: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """What training reads, for the labels and the replay set: the block's inputs on the base
    when the block is trained, else the embeddings."""
    if block_op is None:
        return _embed(engine, labels), _embeddings(engine, replay_x)
    return (
        tensor_values(base, block_op.input_name, labels.x, threads=threads),
        tensor_values(base, block_op.input_name, replay_x, threads=threads),
    )


def _what_to_train(job: Job, base: Bundle) -> str:
    """'block' or 'head': the job's choice, or with 'auto' the most the bundle allows."""
    allowed = base.manifest.block is not None
    if job.train == "block" and not allowed:
        raise _Rejected("the job asks to train the last block, but the bundle allows only its head")
    return "block" if allowed and job.train != "head" else "head"


def _block_op(base: Bundle) -> FullyConnected:
    """The block's op (read_block: it must feed the head directly)."""
    block = base.manifest.block
    assert block is not None
    return read_block(base.model, block.output, base.manifest.output.name)


def _gate(
    job: Job,
    candidate_engine: Engine,
    current_engine: Engine,
    base_engine: Engine,
    holdout: _Samples,
    replay_set: _Samples,
    counts: dict[str, Any],
) -> Verdict:
    """The gate's figures on the int8 models through LiteRT, recorded in `counts`."""
    current_right = _correct(current_engine, holdout)
    candidate_right = _correct(candidate_engine, holdout)
    figures = GateFigures(
        holdout_current=float(current_right.mean()),
        holdout_candidate=float(candidate_right.mean()),
        replay_base=float(_correct(base_engine, replay_set).mean()),
        replay_candidate=float(_correct(candidate_engine, replay_set).mean()),
        fixed=int((candidate_right & ~current_right).sum()),
        broken=int((current_right & ~candidate_right).sum()),
    )
    for name in ("holdout_current", "holdout_candidate", "replay_base", "replay_candidate"):
        counts[name] = round(getattr(figures, name), 4)
    return decide(job.policy, figures)


def _load(path: str) -> tuple[Bundle, str]:
    """The bundle at `path` and the sha256 of its file (the digest slots and signed targets
    name a bundle by), from one read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the bundle ({exc.strerror})") from exc
    try:
        return read_bundle(data), hashlib.sha256(data).hexdigest()
    except FormatError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def _check_labels(labels: JobLabels, base: Bundle) -> None:
    shape = tuple(base.manifest.input.shape[1:])
    if labels.x.shape[1:] != shape:
        raise JobError(
            f"labels.npz inputs have sample shape {list(labels.x.shape[1:])}, the base "
            f"model's is {list(shape)}"
        )
    classes = base.manifest.output.num_classes
    if len(labels) and labels.y.max() >= classes:
        raise JobError(f"labels.npz names class {int(labels.y.max())}, the model has {classes}")


def _embed(engine: Engine, labels: JobLabels) -> npt.NDArray[np.float32]:
    """The labels' embeddings on the base: the stored rows where `embedded`, the rest
    recomputed."""
    size = engine.manifest.embedding.size if engine.manifest.embedding else 0
    out = np.zeros((len(labels), size), np.float32)
    if labels.embedded.any():
        if labels.embeddings.shape[1] != size:
            raise JobError(
                f"labels.npz embeddings have {labels.embeddings.shape[1]} values, the base's "
                f"embedding {size}"
            )
        out[labels.embedded] = labels.embeddings[labels.embedded]
    missing = ~labels.embedded
    if missing.any():
        out[missing] = _embeddings(engine, labels.x[missing])
    return out


def _embeddings(engine: Engine, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    embeddings = engine.predict(x).embeddings
    assert embeddings is not None  # the manifest names an embedding (checked)
    return embeddings


def _correct(engine: Engine, samples: _Samples) -> npt.NDArray[np.bool_]:
    return np.asarray(engine.predict(samples.x).top1 == samples.y)


def _peak_rss() -> float:
    """This process's peak resident set in MiB. Linux's VmHWM where there is one: ru_maxrss
    carries the parent's peak over fork and exec (a worker started from a 750 MB pytest
    reported 750 MB), while VmHWM belongs to this program's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _sentence(exc: BaseException) -> str:
    """The error as the result's one-line reason; errors raised on purpose (ours, the formats',
    the patcher's: all ValueError or EdgedError) speak for themselves, others are named."""
    text = " ".join(str(exc).split())
    if isinstance(exc, EdgedError | ValueError) and text:
        return text
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")


if __name__ == "__main__":
    sys.exit(main())
