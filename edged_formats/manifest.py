"""The model bundle manifest (`manifest.json`): frozen values that validate on construction.

`Manifest.from_json(bytes)` refuses anything off-schema with one `ManifestError` sentence;
`Manifest.to_json()` writes the canonical form (sorted keys). Unknown top-level keys are kept in
`extensions` and written back, so an older reader passes a newer writer's additions through.
The schema is documented in docs/bundle-format.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edged_formats.errors import ManifestError
from edged_formats.scores import ScoreName

__all__ = [
    "FORMAT_VERSION",
    "BlockSpec",
    "Canaries",
    "ConfidenceHistogram",
    "EmbeddingSpec",
    "HeadSpec",
    "InputSpec",
    "Manifest",
    "MemberDigest",
    "OutputSpec",
    "Personalisation",
    "ReferenceStats",
    "ReplaySpec",
]

FORMAT_VERSION = 1
TENSOR_DTYPES = ("float32", "int8", "uint8")
LAYOUTS = ("NHWC", "NLC", "NC")
OUTPUT_KINDS = ("logits", "probabilities")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Versions end up in slot and file names: no separators, no leading dot.
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


# Scores with their own quantile table (max_probability has `confidence_quantiles`).
SCORE_QUANTILE_NAMES: tuple[ScoreName, ...] = ("margin", "entropy")


def _is_quantile(key: str) -> bool:
    try:
        return 0.0 < float(key) < 1.0
    except ValueError:
        return False


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"manifest {where} {problem}")


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise _fail(where, f"is missing the required field '{key}'")
    value = obj[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(f"{where}.{key}", f"must be {name}, not {type(value).__name__}")
    return value


def _number(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = float(_get(obj, key, (int, float), where))
    if not math.isfinite(value):
        raise _fail(f"{where}.{key}", "must be a finite number")
    return value


def _numbers(values: Any, where: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise _fail(where, "must be a list of finite numbers")
    return tuple(float(v) for v in values)


def _reject_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(where, f"has unknown field '{unknown[0]}'")


def _check_shape(shape: Sequence[int], where: str) -> tuple[int, ...]:
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise _fail(where, "must be a non-empty list of positive integers")
    return tuple(shape)


@dataclass(frozen=True, slots=True)
class MemberDigest:
    """Size and sha256 of one archive member."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise _fail("member digest", "sha256 must be 64 lowercase hex digits")
        if self.size < 0:
            raise _fail("member digest", "size must not be negative")


@dataclass(frozen=True, slots=True)
class InputSpec:
    """The model input: `tensor = raw * scale + offset`, then quantised by the tensor's own
    scale and zero point when the tensor is integer."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        _check_shape(self.shape, "input.shape")
        if self.dtype not in TENSOR_DTYPES:
            raise _fail("input.dtype", f"must be one of {', '.join(TENSOR_DTYPES)}")
        if self.layout not in LAYOUTS:
            raise _fail("input.layout", f"must be one of {', '.join(LAYOUTS)}")
        if len(self.layout) != len(self.shape):
            raise _fail("input.layout", f"'{self.layout}' does not fit shape {list(self.shape)}")
        if self.scale == 0 or not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise _fail("input", "scale must be finite and non-zero, offset finite")


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """The class output: logits or probabilities over the labels in `labels_member`."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: Literal["logits", "probabilities"]
    labels_member: str = "labels.txt"

    def __post_init__(self) -> None:
        _check_shape(self.shape, "output.shape")
        if self.dtype not in TENSOR_DTYPES:
            raise _fail("output.dtype", f"must be one of {', '.join(TENSOR_DTYPES)}")
        if self.kind not in OUTPUT_KINDS:
            raise _fail("output.kind", "must be 'logits' or 'probabilities'")

    @property
    def num_classes(self) -> int:
        """Every value after the batch axis is one class score."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """A second model output carrying the embedding that feeds the classifier head."""

    name: str
    size: int

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise _fail("embedding.size", "must be positive")


@dataclass(frozen=True, slots=True)
class HeadSpec:
    """Float weights of the classifier head (`weight` [classes, embedding], `bias` [classes])
    in an .npz member, for on-device fine-tuning."""

    member: str


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """The last block on-device fine-tuning may train besides the head: the FullyConnected op
    that produces the embedding output `output`. Its float weights (`weight` [embedding,
    inputs], `bias` [embedding]) ship in the .npz `member` when given; else the device
    de-quantises them from the model."""

    output: str
    member: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output:
            raise _fail("block.output", "must name the embedding output")
        if self.member is not None and (not isinstance(self.member, str) or not self.member):
            raise _fail("block.member", "must be a member name or null")


@dataclass(frozen=True, slots=True)
class ReplaySpec:
    """A class-balanced set of raw inputs (`x`) and class indices (`y`) in an .npz member,
    against which on-device fine-tuning measures forgetting."""

    member: str


_VERSION_RULE = (
    "must be 1-64 letters, digits, '.', '_', '+' or '-', not starting with a punctuation mark"
)


@dataclass(frozen=True, slots=True)
class Personalisation:
    """Where a device-personalised model comes from: the base bundle (version and sha256 of
    its manifest), how many labels trained it, and the device that trained it (or null)."""

    base_version: str
    base_sha256: str
    labels: int
    device: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_version, str) or not _VERSION.fullmatch(self.base_version):
            raise _fail("personalisation.base_version", _VERSION_RULE)
        if not isinstance(self.base_sha256, str) or not _SHA256.fullmatch(self.base_sha256):
            raise _fail("personalisation.base_sha256", "must be 64 lowercase hex digits")
        if isinstance(self.labels, bool) or not isinstance(self.labels, int) or self.labels < 0:
            raise _fail("personalisation.labels", "must be a non-negative integer")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise _fail("personalisation.device", "must be a non-empty string or null")


@dataclass(frozen=True, slots=True)
class ConfidenceHistogram:
    """Histogram of top-1 probability on validation data, over equal bins of [0, 1]."""

    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.counts) < 2 or any(c < 0 for c in self.counts):
            raise _fail("reference.confidence_histogram", "needs at least 2 non-negative counts")


@dataclass(frozen=True, slots=True)
class ReferenceStats:
    """What the model saw on validation data, for drift detection and gating on the device.

    `granularity` says what a feature is: every input element ("element", small inputs) or
    each channel on the last axis ("channel", images). Statistics are of the raw input.
    `score_quantiles` holds, per score of `edged_formats.scores` other than the top-1
    probability (which is `confidence_quantiles`), the score at each quantile; optional."""

    granularity: Literal["element", "channel"]
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    confidence_histogram: ConfidenceHistogram
    confidence_quantiles: Mapping[str, float]
    samples: int
    score_quantiles: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity not in ("element", "channel"):
            raise _fail("reference.granularity", "must be 'element' or 'channel'")
        if len(self.feature_mean) != len(self.feature_std) or not self.feature_mean:
            raise _fail("reference", "feature_mean and feature_std must be equal, non-empty")
        if any(s < 0 for s in self.feature_std):
            raise _fail("reference.feature_std", "must not be negative")
        if self.samples <= 0:
            raise _fail("reference.samples", "must be positive")
        for score, table in self.score_quantiles.items():
            if score not in SCORE_QUANTILE_NAMES:
                raise _fail("reference.score_quantiles", f"has unknown score '{score}'")
            for key, value in table.items():
                if not _is_quantile(key):
                    raise _fail(
                        f"reference.score_quantiles.{score}",
                        f"key '{key}' is not a quantile between 0 and 1",
                    )
                if not 0.0 <= value <= 1.0:
                    raise _fail(f"reference.score_quantiles.{score}.{key}", "must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class Canaries:
    """Raw inputs (an .npy member, batch first) with the top-1 each must still produce after
    an update: the health check."""

    member: str
    expected_top1: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.expected_top1 or any(i < 0 for i in self.expected_top1):
            raise _fail("canaries.expected_top1", "must be a non-empty list of class indices")


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a device needs to know about one model version."""

    name: str
    version: str
    created_at: str
    members: Mapping[str, MemberDigest]
    input: InputSpec
    output: OutputSpec
    reference: ReferenceStats
    canaries: Canaries
    parent_version: str | None = None
    embedding: EmbeddingSpec | None = None
    head: HeadSpec | None = None
    replay: ReplaySpec | None = None
    personalisation: Personalisation | None = None
    block: BlockSpec | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    extensions: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_format_version(self.format_version)
        if not _NAME.fullmatch(self.name):
            raise _fail("name", "must be 1-64 lowercase letters, digits, '.', '_' or '-'")
        for field_name, value in (
            ("version", self.version),
            ("parent_version", self.parent_version),
        ):
            if value is not None and not _VERSION.fullmatch(value):
                raise _fail(field_name, _VERSION_RULE)
        for member in self.members:
            if not _MEMBER.fullmatch(member):
                raise _fail("members", f"has an unsafe member name '{member}'")
        needed = {"model.tflite", self.output.labels_member, self.canaries.member}
        needed |= {spec.member for spec in (self.head, self.replay) if spec is not None}
        if self.block is not None and self.block.member is not None:
            needed.add(self.block.member)
        missing = sorted(needed - set(self.members))
        if missing:
            raise _fail("members", f"does not list '{missing[0]}'")
        _check_trainable(self)
        if self.reference.granularity == "channel":
            expected_features = self.input.shape[-1]
        else:
            expected_features = math.prod(self.input.shape[1:])
        if len(self.reference.feature_mean) != expected_features:
            raise _fail(
                "reference",
                f"has {len(self.reference.feature_mean)} features but the input has "
                f"{expected_features} {self.reference.granularity}s",
            )
        bad = [i for i in self.canaries.expected_top1 if i >= self.output.num_classes]
        if bad:
            raise _fail("canaries", f"expects class {bad[0]} of {self.output.num_classes}")

    # -- JSON -------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            obj = json.loads(data, parse_constant=_refuse_constant)
        except RecursionError as exc:
            raise ManifestError("manifest is nested too deeply") from exc
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise ManifestError(f"manifest is not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Manifest:
        _check_format_version(_get(obj, "format_version", int, ""))  # before anything else
        if _get(obj, "format", str, "") != "edged-bundle":
            raise _fail("format", "must be 'edged-bundle'")
        members = _members_from(_get(obj, "members", dict, ""))
        known = {
            "format",
            "format_version",
            "name",
            "version",
            "parent_version",
            "created_at",
            "members",
            "input",
            "output",
            "embedding",
            "head",
            "replay",
            "personalisation",
            "block",
            "reference",
            "canaries",
            "metrics",
        }
        parent = obj.get("parent_version")
        if parent is not None and not isinstance(parent, str):
            raise _fail("parent_version", "must be a string or null")
        metrics = _get(obj, "metrics", dict, "") if "metrics" in obj else {}
        return cls(
            name=_get(obj, "name", str, ""),
            version=_get(obj, "version", str, ""),
            parent_version=parent,
            created_at=_get(obj, "created_at", str, ""),
            members=members,
            input=_input_from(_get(obj, "input", dict, "")),
            output=_output_from(_get(obj, "output", dict, "")),
            embedding=_embedding_from(obj.get("embedding")),
            head=_head_from(obj.get("head")),
            replay=_replay_from(obj.get("replay")),
            personalisation=_personalisation_from(obj.get("personalisation")),
            block=_block_from(obj.get("block")),
            reference=_reference_from(_get(obj, "reference", dict, "")),
            canaries=_canaries_from(_get(obj, "canaries", dict, "")),
            metrics={str(k): _number(metrics, k, "metrics") for k in metrics},
            extensions={k: v for k, v in obj.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        ref = self.reference
        out: dict[str, Any] = {
            "format": "edged-bundle",
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
            "members": {
                n: {"sha256": d.sha256, "size": d.size} for n, d in sorted(self.members.items())
            },
            "input": {
                "name": self.input.name,
                "shape": list(self.input.shape),
                "dtype": self.input.dtype,
                "layout": self.input.layout,
                "scale": self.input.scale,
                "offset": self.input.offset,
            },
            "output": {
                "name": self.output.name,
                "shape": list(self.output.shape),
                "dtype": self.output.dtype,
                "kind": self.output.kind,
                "labels_member": self.output.labels_member,
            },
            "embedding": None
            if self.embedding is None
            else {"name": self.embedding.name, "size": self.embedding.size},
            "head": None if self.head is None else {"member": self.head.member},
            "reference": {
                "granularity": ref.granularity,
                "feature_mean": list(ref.feature_mean),
                "feature_std": list(ref.feature_std),
                "confidence_histogram": list(ref.confidence_histogram.counts),
                "confidence_quantiles": dict(ref.confidence_quantiles),
                "samples": ref.samples,
            },
            "canaries": {
                "member": self.canaries.member,
                "expected_top1": list(self.canaries.expected_top1),
            },
            "metrics": dict(self.metrics),
        }
        # Written only when present, so the canonical JSON (and the sha256) of a manifest
        # without them is what it was before these optional fields existed.
        if self.replay is not None:
            out["replay"] = {"member": self.replay.member}
        if self.block is not None:
            out["block"] = {"output": self.block.output}
            if self.block.member is not None:
                out["block"]["member"] = self.block.member
        if self.personalisation is not None:
            p = self.personalisation
            out["personalisation"] = {
                "base_version": p.base_version,
                "base_sha256": p.base_sha256,
                "labels": p.labels,
                "device": p.device,
            }
        if ref.score_quantiles:  # only when present: older readers refuse unknown fields here
            out["reference"]["score_quantiles"] = {
                score: dict(table) for score, table in ref.score_quantiles.items()
            }
        out.update(self.extensions)
        return out

    def to_json(self) -> bytes:
        try:
            return json.dumps(self.to_dict(), sort_keys=True, indent=1, allow_nan=False).encode()
        except ValueError as exc:
            raise ManifestError(f"manifest cannot be written as JSON ({exc})") from exc


def _check_trainable(manifest: Manifest) -> None:
    """What fine-tuning may train must exist: the head and the block need the embedding, and
    the block is the op producing it."""
    if manifest.head is not None and manifest.embedding is None:
        raise _fail("head", "needs an embedding output to train on")
    block, embedding = manifest.block, manifest.embedding
    if block is not None and (embedding is None or block.output != embedding.name):
        raise _fail(
            "block.output",
            "must be the embedding output's name: only the FullyConnected op producing the "
            "embedding may be trained",
        )


def _check_format_version(version: int) -> None:
    if version != FORMAT_VERSION:
        raise _fail("format_version", f"{version} is unknown (this reader knows {FORMAT_VERSION})")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _members_from(d: Mapping[str, Any]) -> dict[str, MemberDigest]:
    members = {}
    for name, digest in d.items():
        if not isinstance(digest, dict):
            raise _fail(f"members.{name}", "must be an object")
        _reject_unknown(digest, {"sha256", "size"}, f"members.{name}")
        members[str(name)] = MemberDigest(
            sha256=_get(digest, "sha256", str, f"members.{name}"),
            size=_get(digest, "size", int, f"members.{name}"),
        )
    return members


def _input_from(d: Mapping[str, Any]) -> InputSpec:
    _reject_unknown(d, {"name", "shape", "dtype", "layout", "scale", "offset"}, "input")
    return InputSpec(
        name=_get(d, "name", str, "input"),
        shape=_check_shape(_get(d, "shape", list, "input"), "input.shape"),
        dtype=_get(d, "dtype", str, "input"),
        layout=_get(d, "layout", str, "input"),
        scale=_number(d, "scale", "input") if "scale" in d else 1.0,
        offset=_number(d, "offset", "input") if "offset" in d else 0.0,
    )


def _output_from(d: Mapping[str, Any]) -> OutputSpec:
    _reject_unknown(d, {"name", "shape", "dtype", "kind", "labels_member"}, "output")
    return OutputSpec(
        name=_get(d, "name", str, "output"),
        shape=_check_shape(_get(d, "shape", list, "output"), "output.shape"),
        dtype=_get(d, "dtype", str, "output"),
        kind=_get(d, "kind", str, "output"),
        labels_member=_get(d, "labels_member", str, "output"),
    )


def _embedding_from(d: Any) -> EmbeddingSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("embedding", "must be an object or null")
    _reject_unknown(d, {"name", "size"}, "embedding")
    return EmbeddingSpec(_get(d, "name", str, "embedding"), _get(d, "size", int, "embedding"))


def _head_from(d: Any) -> HeadSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("head", "must be an object or null")
    _reject_unknown(d, {"member"}, "head")
    return HeadSpec(_get(d, "member", str, "head"))


def _replay_from(d: Any) -> ReplaySpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("replay", "must be an object or null")
    _reject_unknown(d, {"member"}, "replay")
    return ReplaySpec(_get(d, "member", str, "replay"))


def _block_from(d: Any) -> BlockSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("block", "must be an object or null")
    _reject_unknown(d, {"output", "member"}, "block")
    member = d.get("member")
    if member is not None and not isinstance(member, str):
        raise _fail("block.member", f"must be a string or null, not {type(member).__name__}")
    return BlockSpec(_get(d, "output", str, "block"), member)


def _personalisation_from(d: Any) -> Personalisation | None:
    if d is None:
        return None
    where = "personalisation"
    if not isinstance(d, dict):
        raise _fail(where, "must be an object or null")
    _reject_unknown(d, {"base_version", "base_sha256", "labels", "device"}, where)
    if "device" not in d:
        raise _fail(where, "is missing the required field 'device'")
    device = d["device"]
    if device is not None and not isinstance(device, str):
        raise _fail(f"{where}.device", f"must be a string or null, not {type(device).__name__}")
    return Personalisation(
        base_version=_get(d, "base_version", str, where),
        base_sha256=_get(d, "base_sha256", str, where),
        labels=_get(d, "labels", int, where),
        device=device,
    )


def _reference_from(d: Mapping[str, Any]) -> ReferenceStats:
    fields = {
        "granularity",
        "feature_mean",
        "feature_std",
        "confidence_histogram",
        "confidence_quantiles",
        "samples",
        "score_quantiles",
    }
    _reject_unknown(d, fields, "reference")
    counts = _get(d, "confidence_histogram", list, "reference")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise _fail("reference.confidence_histogram", "must be a list of integer counts")
    quantiles = _get(d, "confidence_quantiles", dict, "reference")
    return ReferenceStats(
        granularity=_get(d, "granularity", str, "reference"),
        feature_mean=_numbers(d.get("feature_mean"), "reference.feature_mean"),
        feature_std=_numbers(d.get("feature_std"), "reference.feature_std"),
        confidence_histogram=ConfidenceHistogram(tuple(counts)),
        confidence_quantiles={
            str(k): _number(quantiles, k, "reference.confidence_quantiles") for k in quantiles
        },
        samples=_get(d, "samples", int, "reference"),
        score_quantiles=_score_quantiles_from(d),
    )


def _score_quantiles_from(d: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    if "score_quantiles" not in d:
        return {}
    tables = _get(d, "score_quantiles", dict, "reference")
    _reject_unknown(tables, set(SCORE_QUANTILE_NAMES), "reference.score_quantiles")
    out = {}
    for score in tables:
        where = f"reference.score_quantiles.{score}"
        table = _get(tables, score, dict, "reference.score_quantiles")
        out[str(score)] = {str(k): _number(table, k, where) for k in table}
    return out


def _canaries_from(d: Mapping[str, Any]) -> Canaries:
    _reject_unknown(d, {"member", "expected_top1"}, "canaries")
    top1 = _get(d, "expected_top1", list, "canaries")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in top1):
        raise _fail("canaries.expected_top1", "must be a list of class indices")
    return Canaries(member=_get(d, "member", str, "canaries"), expected_top1=tuple(top1))
