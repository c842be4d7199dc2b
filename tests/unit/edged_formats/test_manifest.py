"""The bundle manifest schema: round trip and one clear refusal per kind of mistake."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edged_formats import BlockSpec, Manifest, ManifestError, Personalisation, ReplaySpec

from .samples import PERSONALISATION, manifest_dict


def test_round_trip_is_lossless() -> None:
    """A manifest read from JSON writes back the same JSON, extensions included."""
    obj = manifest_dict()
    obj["x-future-field"] = {"kept": True}
    manifest = Manifest.from_dict(obj)
    assert json.loads(manifest.to_json()) == obj
    assert manifest.extensions == {"x-future-field": {"kept": True}}


def _mutated(path: str, value: Any) -> dict[str, Any]:
    obj = manifest_dict()
    *parents, last = path.split("/")
    target = obj
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("format_version", 2, "format_version 2 is unknown"),
        ("format", "zip", "format must be 'edged-bundle'"),
        ("name", KeyError, "missing the required field 'name'"),
        ("name", "Bad Name!", "manifest name must be"),
        ("input/shape", [1, 0, 8], "input.shape must be a non-empty list of positive"),
        ("input/dtype", "float16", "input.dtype must be one of"),
        ("input/layout", "NC", "'NC' does not fit shape"),
        ("input/scale", 0, "scale must be finite and non-zero"),
        ("input/colour", "rgb", "input has unknown field 'colour'"),
        ("output/kind", "scores", "output.kind must be 'logits' or 'probabilities'"),
        ("output/shape", "10", "output.shape must be list"),
        ("members/model.tflite/sha256", "abc", "sha256 must be 64 lowercase hex"),
        ("members/labels.txt", KeyError, "members does not list 'labels.txt'"),
        ("canaries/expected_top1", [3, 10], "expects class 10 of 10"),
        ("reference/feature_mean", [0.0], "feature_mean and feature_std must be equal"),
        ("reference/granularity", "channel", "has 64 features but the input has 1 channels"),
        ("reference/samples", True, "reference.samples must be int, not bool"),
        ("metrics/accuracy", float("nan"), "metrics.accuracy must be a finite number"),
        ("head", {"member": "head.npz"}, "members does not list 'head.npz'"),
        ("name", "digits\n", "manifest name must be"),
        ("version", "../../etc/x", "manifest version must be 1-64 letters"),
        ("parent_version", "1.0/evil", "manifest parent_version must be"),
    ],
)
def test_refuses_bad_manifest_with_one_sentence(path: str, value: Any, message: str) -> None:
    """Every schema violation names the field and the problem in one line."""
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_dict(_mutated(path, value))
    assert "\n" not in str(info.value)


def test_refuses_non_json() -> None:
    """Bytes that are not JSON are refused, not crashed on."""
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json(b"\xff{not json")
    with pytest.raises(ManifestError, match="must be a JSON object"):
        Manifest.from_json(b"[1, 2]")


def test_head_needs_an_embedding() -> None:
    """A fine-tunable head without an embedding output to train on is refused."""
    obj = manifest_dict(with_head=True)
    obj["embedding"] = None
    with pytest.raises(ManifestError, match="head needs an embedding"):
        Manifest.from_dict(obj)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply|not valid JSON"),
        ('{"format_version": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"format_version": NaN}', "NaN is not a number JSON allows"),
    ],
)
def test_refuses_hostile_json(text: str, message: str) -> None:
    """Deep nesting, 5000-digit integers and NaN are refused with a sentence, not a crash."""
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(text)


def test_class_count_is_every_value_after_the_batch_axis() -> None:
    """An output of shape [1, 2, 5] has 10 class scores, so it needs 10 labels."""
    obj = manifest_dict()
    obj["output"]["shape"] = [1, 2, 5]
    assert Manifest.from_dict(obj).output.num_classes == 10


SCORE_QUANTILES = {"margin": {"0.05": 0.2, "0.5": 0.8}, "entropy": {"0.05": 0.35}}


def test_score_quantiles_round_trip() -> None:
    """Margin and entropy quantile tables are read and written back unchanged."""
    obj = manifest_dict()
    obj["reference"]["score_quantiles"] = SCORE_QUANTILES
    manifest = Manifest.from_dict(obj)
    assert manifest.reference.score_quantiles == SCORE_QUANTILES
    assert json.loads(manifest.to_json()) == obj


def test_score_quantiles_are_written_only_when_present() -> None:
    """Without score quantiles the field stays out of the JSON, so older readers still read it."""
    manifest = Manifest.from_dict(manifest_dict())
    assert manifest.reference.score_quantiles == {}
    assert "score_quantiles" not in json.loads(manifest.to_json())["reference"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([0.1], "reference.score_quantiles must be dict, not list"),
        ({"max_probability": {"0.05": 0.5}}, "score_quantiles has unknown field 'max_probability'"),
        ({"margin": [0.1]}, "reference.score_quantiles.margin must be dict, not list"),
        ({"margin": {"0.05": "x"}}, r"score_quantiles\.margin\.0\.05 must be int or float"),
        ({"margin": {"0.05": 1.5}}, r"score_quantiles\.margin\.0\.05 must be in \[0, 1\]"),
        ({"entropy": {"median": 0.5}}, "key 'median' is not a quantile between 0 and 1"),
        ({"entropy": {"1.5": 0.5}}, "key '1.5' is not a quantile between 0 and 1"),
    ],
)
def test_refuses_bad_score_quantiles(value: Any, message: str) -> None:
    """Off-schema score quantile tables are refused with one sentence naming the field."""
    obj = manifest_dict()
    obj["reference"]["score_quantiles"] = value
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_dict(obj)
    assert "\n" not in str(info.value)


def test_replay_and_personalisation_round_trip() -> None:
    """Replay and personalisation are read into their values and written back unchanged."""
    obj = manifest_dict(with_replay=True)
    obj["personalisation"] = dict(PERSONALISATION)
    manifest = Manifest.from_dict(obj)
    assert manifest.replay == ReplaySpec("replay.npz")
    assert manifest.personalisation == Personalisation("1.2.0", "ab" * 32, 300, "cam-01")
    assert manifest.extensions == {}
    assert json.loads(manifest.to_json()) == obj
    assert Manifest.from_json(manifest.to_json()) == manifest
    obj["personalisation"]["device"] = None
    assert Manifest.from_dict(obj).personalisation == Personalisation("1.2.0", "ab" * 32, 300)


def test_replay_and_personalisation_are_optional() -> None:
    """A manifest without them (absent or null) loads with None and writes neither, so its
    canonical JSON and sha256 are what they were before the fields existed."""
    obj = manifest_dict()
    manifest = Manifest.from_dict(obj)
    assert manifest.replay is None and manifest.personalisation is None
    written = json.loads(manifest.to_json())
    assert "replay" not in written and "personalisation" not in written
    assert Manifest.from_dict({**obj, "replay": None, "personalisation": None}) == manifest


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("replay", {"member": "replay.npz"}, "members does not list 'replay.npz'"),
        ("replay", "replay.npz", "manifest replay must be an object or null"),
        ("replay", {"member": "replay.npz", "n": 5}, "replay has unknown field 'n'"),
        ("replay", {}, "replay is missing the required field 'member'"),
        ("personalisation", [], "personalisation must be an object or null"),
        ("personalisation/base_version", "../x", "personalisation.base_version must be 1-64"),
        ("personalisation/base_version", 1, "personalisation.base_version must be str, not int"),
        ("personalisation/base_sha256", "AB" * 32, "base_sha256 must be 64 lowercase hex"),
        ("personalisation/base_sha256", "ab" * 31, "base_sha256 must be 64 lowercase hex"),
        ("personalisation/labels", -1, "personalisation.labels must be a non-negative integer"),
        ("personalisation/labels", True, "personalisation.labels must be int, not bool"),
        ("personalisation/labels", 2.0, "personalisation.labels must be int, not float"),
        ("personalisation/device", 7, "personalisation.device must be a string or null, not int"),
        ("personalisation/device", "", "personalisation.device must be a non-empty string"),
        ("personalisation/device", KeyError, "personalisation is missing the required field 'de"),
        ("personalisation/labels", KeyError, "personalisation is missing the required field 'la"),
        ("personalisation/seed", 0, "personalisation has unknown field 'seed'"),
    ],
)
def test_refuses_bad_replay_or_personalisation(field: str, value: Any, message: str) -> None:
    """Off-schema replay or personalisation fields are refused with one sentence naming them."""
    obj = manifest_dict()
    obj["personalisation"] = dict(PERSONALISATION)
    *parents, last = field.split("/")
    target = obj[parents[0]] if parents else obj
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_dict(obj)
    assert "\n" not in str(info.value)


def test_personalisation_value_validates_on_construction() -> None:
    """The frozen value refuses a bad field when built directly, not only from JSON."""
    with pytest.raises(ManifestError, match="base_sha256 must be 64 lowercase hex"):
        Personalisation("1.0.0", "0" * 63, 1)
    with pytest.raises(ManifestError, match="labels must be a non-negative integer"):
        Personalisation("1.0.0", "0" * 64, -3)


def test_block_round_trips_and_is_written_only_when_present() -> None:
    """`block` naming the embedding output reads back as a BlockSpec and writes back the same
    JSON; a manifest without it writes no `block` field."""
    obj = manifest_dict(with_head=True)
    assert "block" not in json.loads(Manifest.from_dict(obj).to_json())
    obj["block"] = {"output": "emb"}
    manifest = Manifest.from_dict(obj)
    assert manifest.block == BlockSpec("emb")
    assert json.loads(manifest.to_json()) == obj


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"output": "out"}, "block.output must be the embedding output's name: only the "),
        ({"output": ""}, "block.output must name the embedding output"),
        ({"output": 3}, "block.output must be str, not int"),
        ({}, "block is missing the required field 'output'"),
        ({"output": "emb", "layers": 2}, "block has unknown field 'layers'"),
        ({"output": "emb", "member": "block.npz"}, "members does not list 'block.npz'"),
        ({"output": "emb", "member": 1}, "block.member must be a string or null, not int"),
        ("emb", "manifest block must be an object or null"),
    ],
)
def test_refuses_a_malformed_block_with_one_sentence(value: Any, message: str) -> None:
    """An off-schema `block`, or one naming anything but the embedding output, is refused
    with one sentence naming the field."""
    obj = manifest_dict(with_head=True)
    obj["block"] = value
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_dict(obj)
    assert "\n" not in str(info.value)


def test_block_needs_an_embedding() -> None:
    """A block on a manifest with no embedding output is refused."""
    obj = manifest_dict()
    obj["block"] = {"output": "emb"}
    with pytest.raises(ManifestError, match=r"block\.output must be the embedding output's name"):
        Manifest.from_dict(obj)
