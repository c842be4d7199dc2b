"""The label intake on real SQLite files: labels found by sample id or ref, refusals counted,
the cloud's documents applied once with a cursor that only moves over contiguous seqs, and the
operator's switch."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edged.config import FinetuneConfig
from edged.finetune.intake import LabelIntake, PersonalisationState
from edged.labels import LabelStore, Recent
from edged.sample_store import KeptSample, SampleStore

SHAPE = (8, 8, 1)


@pytest.fixture
async def intake(tmp_path: Path) -> Any:
    async with (
        LabelStore(tmp_path / "labels.db") as labels,
        SampleStore(tmp_path / "samples.db") as samples,
    ):
        engine = SimpleNamespace(
            labels=tuple(str(i) for i in range(10)),
            sample_shape=SHAPE,
            manifest=SimpleNamespace(block=None),  # a head-only base
        )
        serving = SimpleNamespace(engine=engine)
        state = PersonalisationState()
        woken: list[int] = []
        made = LabelIntake(
            lambda: FinetuneConfig(enabled=True),
            labels,
            samples,
            serving,  # type: ignore[arg-type]
            state,
            lambda: state.save(tmp_path / "state.json"),
            lambda: woken.append(1),
            lambda: True,
        )
        made.woken = woken  # type: ignore[attr-defined]
        await samples.add(
            KeptSample("1-a", 0.0, "1.0.0+local.2", "uncertain", 3, _x(3), np.zeros(10), None)
        )
        for i in range(5):
            made.recent.add(Recent(None, "cam", f"r{i}", _x(i), None, "1.0.0", i, 0.99))
        yield made


def _x(value: int) -> np.ndarray:
    return np.full(SHAPE, value, np.uint8)


async def test_labels_find_their_sample_by_id_or_ref_and_refusals_are_counted(intake) -> None:
    assert await intake.label("7", "local", sample_id="1-a") == "stored"
    assert await intake.label("2", "local", ref="r2", source="cam") == "stored"
    assert await intake.label("4", "local", ref="r4") == "stored"  # any source
    assert await intake.label("7", "local", sample_id="nope") == "unknown_sample"
    assert await intake.label("7", "local", ref="r9") == "unknown_sample"
    assert await intake.label("cat", "local", ref="r1") == "unknown_label"
    stored = {lb.key: lb for lb in await intake.labels.all()}
    assert set(stored) == {"1-a", "cam/r2", "cam/r4"}
    assert stored["1-a"].label == 7 and stored["1-a"].embedded_on == "1.0.0"  # its base
    assert np.array_equal(stored["cam/r2"].input, _x(2))
    assert intake.refused == {"unknown_sample": 2, "unknown_label": 1}
    assert len(intake.woken) == 3
    intake.serving.engine.manifest.block = "emb"  # a base whose last block may be trained
    assert await intake.label("5", "local", sample_id="1-a") == "stored"
    relabelled = {lb.key: lb for lb in await intake.labels.all()}["1-a"]
    assert (relabelled.label, relabelled.embedded_on) == (5, "1.0.0+local.2")  # its own


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'{"label": "3"}',
        b'{"ref": "r1"}',
        b'{"ref": "r1", "label": 3}',
        b'{"sample_id": 5, "ref": "r1", "label": "3"}',
    ],
)
async def test_malformed_truth_messages_are_counted_not_stored(intake, payload) -> None:
    await intake.truth(payload)
    assert intake.refused == {"malformed": 1} and intake.labels.count == 0


async def test_a_truth_message_stores_a_local_label(intake) -> None:
    await intake.truth(json.dumps({"ref": "r3", "source": "cam", "label": "3"}).encode())
    [label] = await intake.labels.all()
    assert (label.key, label.label, label.source) == ("cam/r3", 3, "local")


async def test_cloud_documents_apply_once_and_the_cursor_moves_over_contiguous_seqs(
    intake,
) -> None:
    def doc(*entries: tuple[int, str]) -> dict[str, Any]:
        return {"labels": [{"seq": s, "sample_id": i, "label": "5"} for s, i in entries]}

    await intake.apply(doc((1, "1-a"), (3, "nope")))  # seq 2 missing
    assert intake.state.cloud_seq == 1 and intake.state.pending_seqs == [3]
    added = intake.labels.added
    await intake.apply(doc((1, "1-a"), (3, "nope")))  # redelivered: nothing applied again
    assert intake.labels.added == added and intake.refused == {"unknown_sample": 1}
    await intake.apply(doc((2, "1-a")))
    assert intake.state.cloud_seq == 3 and intake.state.pending_seqs == []
    await intake.apply({"labels": [{"seq": "4"}, 7]})
    assert intake.refused["malformed"] == 2 and intake.state.cloud_seq == 3
    saved = json.loads((Path(intake.labels.path).parent / "state.json").read_text())
    assert saved["cloud_seq"] == 3


async def test_the_operator_switch_is_remembered_and_switching_back_on_rebuilds(intake) -> None:
    await intake.apply({"enabled": False, "labels": []})
    assert intake.state.operator is False and intake.state.rebuild is False
    intake.state.reverted_from = "abc"
    await intake.apply({"enabled": True, "labels": []})
    assert intake.state.operator is True and intake.state.rebuild is True
    assert intake.state.reverted_from is None
