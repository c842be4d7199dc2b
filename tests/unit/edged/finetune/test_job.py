"""The job directory's files: round trips, malformed job files refused with one sentence, and
the daemon's side of the API importing no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.finetune.job import (
    Job,
    JobError,
    JobLabels,
    Result,
    read_job,
    read_labels,
    read_result,
    write_job,
    write_result,
)

SHA = "ab" * 32


def _job(**changes: object) -> Job:
    fields: dict[str, object] = {
        "base": "/state/finetune/base.edb",
        "base_sha256": SHA,
        "current": "/state/slots/a.edb",
        "version": "1.0.0+local.3",
        "device": "dev-1",
    }
    return Job(**(fields | changes))  # type: ignore[arg-type]


def _labels(n: int = 3) -> JobLabels:
    return JobLabels(
        keys=np.array([f"s{i}" for i in range(n)]),
        x=np.zeros((n, 8, 8, 1), np.uint8),
        y=np.arange(n, dtype=np.int64),
        embeddings=np.ones((n, 4), np.float32),
        embedded=np.array([True] * (n - 1) + [False]),
    )


def test_job_and_labels_round_trip(tmp_path: Path) -> None:
    """write_job then read_job/read_labels gives back the same job and arrays."""
    job, labels = _job(holdout_share=0.3, threads=2), _labels()
    write_job(tmp_path / "job", job, labels)
    assert read_job(tmp_path / "job") == job
    back = read_labels(tmp_path / "job")
    for name in ("keys", "x", "y", "embeddings", "embedded"):
        assert np.array_equal(getattr(back, name), getattr(labels, name))
        assert getattr(back, name).dtype == getattr(labels, name).dtype
    written = json.loads((tmp_path / "job" / "job.json").read_text())
    assert written["format"] == 1 and written["min_holdout"] == 20


def _write_raw(tmp_path: Path, obj: object) -> Path:
    (tmp_path / "job.json").write_text(json.dumps(obj))
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "job.json has format 2, this worker reads 1"),
        ({"base": None}, "job.json field 'base' must be str, not NoneType"),
        ({"base_sha256": "xyz"}, "job.json field 'base_sha256' must be 64 lowercase hex digits"),
        ({"holdout_share": 1.5}, "job.json field 'holdout_share' is 1.5, outside 0..1"),
        ({"threads": True}, "job.json field 'threads' must be int, not bool"),
        ({"threads": 0}, "job.json field 'threads' is 0, outside 1..64"),
        ({"max_iter": 2.5}, "job.json field 'max_iter' must be int, not float"),
        ({"version": "../x"}, "job.json field 'version' must be 1-64 letters"),
        ({"colour": "red"}, "job.json has unknown field 'colour'"),
    ],
)
def test_malformed_job_is_refused_with_a_sentence(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    """Each kind of malformed field is refused with one JobError naming the field."""
    obj = json.loads(_job().to_json()) | change
    with pytest.raises(JobError) as caught:
        read_job(_write_raw(tmp_path, obj))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_unreadable_job_files_are_refused(tmp_path: Path) -> None:
    """No job.json, not JSON, not an object, a missing field: each one JobError."""
    with pytest.raises(JobError, match=r"has no job\.json"):
        read_job(tmp_path)
    (tmp_path / "job.json").write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        read_job(tmp_path)
    with pytest.raises(JobError, match="must hold a JSON object"):
        read_job(_write_raw(tmp_path, [1]))
    obj = json.loads(_job().to_json())
    del obj["version"]
    with pytest.raises(JobError, match="lacks the required field 'version'"):
        read_job(_write_raw(tmp_path, obj))


def test_inconsistent_labels_are_refused() -> None:
    """Arrays of different lengths, repeated keys or wrong dtypes: JobError."""
    good = _labels()
    with pytest.raises(JobError, match="3 keys but 2 y"):
        JobLabels(good.keys, good.x, good.y[:2], good.embeddings, good.embedded)
    with pytest.raises(JobError, match="more than once"):
        JobLabels(np.array(["a", "a", "b"]), good.x, good.y, good.embeddings, good.embedded)
    with pytest.raises(JobError, match="int64"):
        JobLabels(good.keys, good.x, good.y.astype(np.int32), good.embeddings, good.embedded)


def test_result_round_trip_and_absence(tmp_path: Path) -> None:
    """No result.json reads as None; a written result reads back equal, unknown keys kept
    aside; a malformed one is a JobError."""
    assert read_result(tmp_path) is None
    result = Result("rejected", "the bundle ships no replay set", version="1.0.0+local.1")
    write_result(tmp_path, result)
    assert read_result(tmp_path) == result
    obj = json.loads((tmp_path / "result.json").read_text()) | {"later": 1}
    (tmp_path / "result.json").write_text(json.dumps(obj))
    assert read_result(tmp_path) == Result(
        "rejected", "the bundle ships no replay set", version="1.0.0+local.1", extra={"later": 1}
    )
    (tmp_path / "result.json").write_text(json.dumps(obj | {"verdict": "maybe"}))
    with pytest.raises(JobError, match="verdict 'maybe'"):
        read_result(tmp_path)


def test_daemon_side_imports_no_torch() -> None:
    """The package, the job files, the gate, the split, the patcher and the export load
    without torch."""
    code = (
        "import sys, edged.finetune, edged.finetune.job, edged.finetune.gate, "
        "edged.finetune.split, edged.finetune.head_patch, edged.finetune.export; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
