"""The daemon's configuration: one TOML file (`/etc/edged/edged.toml` by default), typed, loaded
once and passed down. Unknown keys are refused; every bound is checked when the file is read, and
the first problem is explained in one sentence naming the key (`edged check-config FILE`).

Sections: [device] [engine] [pipeline] [[source]] [local_mqtt] [gating] [drift] [uplink]
[outbox] [update] [finetune] [telemetry] [status] [log]. docs/daemon.md lists every key with
its bounds, packaging/edged.toml with its default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
from msgspec import Meta

from edged.drift import DriftConfig
from edged.errors import EdgedError
from edged.gating import GatingConfig

__all__ = [
    "DEFAULT_PATH",
    "Config",
    "ConfigError",
    "FinetuneConfig",
    "LocalMqttConfig",
    "MqttSourceConfig",
    "ReplaySourceConfig",
    "SourceConfig",
    "SpoolSourceConfig",
    "UpdateConfig",
    "load_config",
    "parse_config",
]

DEFAULT_PATH = Path("/etc/edged/edged.toml")
MIB = 1 << 20

Positive = Annotated[float, Meta(gt=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
Name = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
Share = Annotated[float, Meta(ge=0, le=1)]
Tag = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class ConfigError(EdgedError):
    """The configuration file is missing, not TOML, or breaks a rule."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class DeviceConfig(_Section, frozen=True):
    """`state_dir` holds the key, outbox, sample store and model slots (`models/`); `model`
    is the configured bundle: adopted as the known good model on the first start, and when
    its content changes later (restart or SIGHUP) installed through the health trial."""

    state_dir: Path = Path("/var/lib/edged")
    model: Path = Path("/var/lib/edged/models/current.edb")


class EngineConfig(_Section, frozen=True):
    runtime: Literal["auto", "ai-edge-litert", "tflite-runtime"] = "auto"
    threads: Annotated[int, Meta(ge=1, le=64)] = 1
    max_batch: Annotated[int, Meta(ge=1, le=1024)] = 8


class PipelineConfig(_Section, frozen=True):
    """`queue_size` samples wait for inference; sources block beyond it (backpressure)."""

    queue_size: Annotated[int, Meta(ge=1, le=65536)] = 64
    drain_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    max_pending_writes: Annotated[int, Meta(ge=1, le=65536)] = 256


class MqttSourceConfig(_Section, frozen=True, tag="mqtt", tag_field="kind"):
    """Samples published on the local broker. QoS 1 gives backpressure (the broker holds what
    the queue cannot take) and redelivery of what was not processed before a stop."""

    name: Name
    topic: str
    format: Literal["npy", "raw", "cbor", "image"] = "npy"
    qos: Literal[0, 1] = 1
    max_bytes: Annotated[int, Meta(ge=1, le=64 * MIB)] = 4 * MIB


class SpoolSourceConfig(_Section, frozen=True, tag="spool", tag_field="kind"):
    """.npy or image files dropped into `path` (write, then rename: names starting with '.' or
    ending in .tmp/.part are not read yet); removed once processed, moved to `rejected/` when
    bad."""

    name: Name
    path: Path
    poll_s: Annotated[float, Meta(gt=0, le=60)] = 0.2
    max_bytes: Annotated[int, Meta(ge=1, le=256 * MIB)] = 16 * MIB
    keep_rejected: Annotated[int, Meta(ge=0, le=100_000)] = 100


class ReplaySourceConfig(_Section, frozen=True, tag="replay", tag_field="kind"):
    """A dataset file (.npy, or .npz with `array`) streamed as if live; resumes after a restart
    at the first sample not yet processed."""

    name: Name
    path: Path
    array: str = "x"
    rate_hz: Annotated[float, Meta(gt=0)] | None = None
    loop: bool = False


SourceConfig = MqttSourceConfig | SpoolSourceConfig | ReplaySourceConfig


class LocalMqttConfig(_Section, frozen=True):
    """The device's own broker: MQTT sources read from it, results are published on it."""

    host: str = "127.0.0.1"
    port: Port = 1883
    username: str | None = None
    password_file: Path | None = None
    results_topic: str = "edged/local/results"


class UplinkSection(_Section, frozen=True):
    """The cloud broker. Secrets live in files readable by the daemon only."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 1883
    device_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    bytes_per_s: Positive | None = None
    bytes_per_day: Annotated[int, Meta(gt=0)] | None = None
    stop_grace_s: Annotated[float, Meta(ge=0, le=60)] = 3.0  # send what is queued at a stop


class OutboxSection(_Section, frozen=True):
    quota_mb: Annotated[int, Meta(ge=1, le=1 << 20)] = 64
    min_free_mb: Annotated[int, Meta(ge=0, le=1 << 20)] = 64


class UpdateConfig(_Section, frozen=True):
    """Model updates (docs/ota.md): which targets this device takes, and the health trial a
    new model must pass before it becomes the known good one.

    A trial model may be started `max_start_attempts` times (the switch counts as the first)
    before the next start rolls back without loading it. The trial passes its canaries when at
    least `canary_min_agreement` of them give the manifest's top-1, then watches live traffic
    for `watch_s` (0: commit on the canaries alone): once `min_watch_samples` results are in,
    an inference error rate over `max_error_rate`, a mean confidence more than
    `max_confidence_drop` below the previous model's, or a median latency more than
    `max_latency_ratio` times the previous model's rolls it back."""

    enabled: bool = True  # ask the control plane for updates (needs `edged enroll`)
    hardware: Tag = "any"  # this device's compatibility tag, matched against targets
    channel: Tag = "stable"
    poll_s: Annotated[float, Meta(ge=10, le=604_800)] = 3600.0  # ask for an update this often
    bytes_per_s: Positive | None = None  # download bandwidth limit (None: as fast as it goes)
    timeout_s: Annotated[float, Meta(gt=0, le=600)] = 30.0  # a stalled transfer is retried
    max_start_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    canary_min_agreement: Share = 1.0
    watch_s: Annotated[float, Meta(ge=0, le=86_400)] = 300.0
    min_watch_samples: Annotated[int, Meta(ge=1, le=1_000_000)] = 50
    max_error_rate: Share = 0.05
    max_confidence_drop: Share = 0.1
    max_latency_ratio: Annotated[float, Meta(ge=1, le=1000)] = 2.0


class FinetuneConfig(_Section, frozen=True):
    """On-device fine-tuning (docs/finetune.md). Off unless `enabled` (and the operator's switch
    allows it). A job starts once `min_labels` labels are stored and `min_new_labels` arrived
    since the last job (or a drift event fired with at least `min_labels`), at most every
    `min_interval_s`. The worker runs at low priority with `threads` threads, an address-space
    cap of `memory_mb` and a `timeout_s` wall clock, as the daemon's child process
    (`launcher = "process"`) or handed to the edged-finetune systemd units (`"systemd"`, which
    must start it within `systemd_start_s`). A candidate installs only if it beats the
    serving model on the hold-out by `min_gain` and loses at most `max_replay_loss` on the
    bundle's replay set against the base. `pseudo_label_confidence` > 0 turns results at least
    that confident into labels of their own top-1: risky, off by default. `train` chooses what
    the worker trains: the head, the head and the last block (only where the bundle allows
    it), or "auto", the most the bundle allows; `anchor` and `block_anchor` pull the head and
    the block towards the base's."""

    enabled: bool = False
    truth_topic: str = "edged/local/truth"  # local ground truth on [local_mqtt]
    pseudo_label_confidence: Share = 0.0
    min_labels: Annotated[int, Meta(ge=10, le=1_000_000)] = 100
    min_new_labels: Annotated[int, Meta(ge=1, le=1_000_000)] = 50
    on_drift: bool = True
    min_interval_s: Annotated[float, Meta(ge=0, le=604_800)] = 600.0
    max_labels: Annotated[int, Meta(ge=10, le=1_000_000)] = 5000
    max_label_mb: Annotated[int, Meta(ge=1, le=1 << 16)] = 64
    recent_results: Annotated[int, Meta(ge=0, le=1_000_000)] = 1024  # labelable by ref
    recent_mb: Annotated[int, Meta(ge=0, le=1 << 14)] = 16
    holdout_share: Annotated[float, Meta(ge=0.05, le=0.9)] = 0.25
    min_holdout: Annotated[int, Meta(ge=1, le=100_000)] = 20
    min_gain: Annotated[float, Meta(ge=0, le=1)] = 0.02
    max_replay_loss: Share = 0.02
    anchor: Annotated[float, Meta(ge=0, le=100)] = 0.001
    block_anchor: Annotated[float, Meta(ge=0, le=100)] = 1e-5
    train: Literal["auto", "head", "block"] = "auto"
    max_iter: Annotated[int, Meta(ge=1, le=100_000)] = 500
    threads: Annotated[int, Meta(ge=1, le=64)] = 1
    memory_mb: Annotated[int, Meta(ge=256, le=1 << 20)] = 2048
    timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 1800.0
    launcher: Literal["process", "systemd"] = "process"
    systemd_start_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0


class TelemetryConfig(_Section, frozen=True):
    interval_s: Annotated[float, Meta(ge=1, le=86_400)] = 60.0


class StatusConfig(_Section, frozen=True):
    socket: Path = Path("/run/edged/status.sock")


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "kv", "json"] = "auto"


class Config(_Section, frozen=True):
    device: DeviceConfig = msgspec.field(default_factory=DeviceConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    source: list[SourceConfig] = msgspec.field(default_factory=list)
    local_mqtt: LocalMqttConfig | None = None
    gating: GatingConfig = msgspec.field(default_factory=GatingConfig)
    drift: DriftConfig = msgspec.field(default_factory=DriftConfig)
    uplink: UplinkSection = msgspec.field(default_factory=UplinkSection)
    outbox: OutboxSection = msgspec.field(default_factory=OutboxSection)
    update: UpdateConfig = msgspec.field(default_factory=UpdateConfig)
    finetune: FinetuneConfig = msgspec.field(default_factory=FinetuneConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    plugins: list[Annotated[str, Meta(pattern=r"^[\w.]+:\w+$")]] = msgspec.field(
        default_factory=list
    )

    def __post_init__(self) -> None:
        names = [s.name for s in self.source]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"two sources are named {duplicate!r}; names must be unique")
        if any(isinstance(s, MqttSourceConfig) for s in self.source) and self.local_mqtt is None:
            raise ValueError("an mqtt source needs a [local_mqtt] section")


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _sentence(error: msgspec.ValidationError, data: object) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.pipeline.queue_size`" as
    "pipeline.queue_size: expected `int` >= 1"; a value outside a fixed set names the set."""
    match = _AT.match(str(error))
    message = match["message"] if match else str(error)
    path = (match["path"] or "") if match else ""
    message = message.replace("Object contains unknown field", "unknown key")
    message = message.replace("Object missing required field", "missing required key")
    message = message[:1].lower() + message[1:]
    if message.startswith(("invalid enum value", "invalid value")):
        choices = _choices(path, data)
        if choices:
            message += f" (one of {', '.join(repr(c) for c in choices)})"
    path = path.lstrip(".")
    return f"{path}: {message}" if path else message


def _choices(path: str, data: object) -> tuple[object, ...] | None:
    """The allowed values of the Literal field at msgspec's `path` (".log.format",
    ".source[0].kind"); tagged unions are resolved by the element's own tag."""
    kind: Any = msgspec.inspect.type_info(Config)
    for name, index in _STEP.findall(path):
        if isinstance(kind, msgspec.inspect.UnionType):  # a tagged struct: pick by its tag
            tag_field = getattr(kind.types[0], "tag_field", None)
            if name and name == tag_field:
                return tuple(getattr(t, "tag", None) for t in kind.types)
            tag = data.get(tag_field) if isinstance(data, dict) else None
            kind = next((t for t in kind.types if getattr(t, "tag", None) == tag), None)
        if isinstance(kind, msgspec.inspect.ListType) and index:
            kind = kind.item_type
            data = data[int(index)] if isinstance(data, list) and int(index) < len(data) else None
        elif isinstance(kind, msgspec.inspect.StructType) and name:
            kind = next((f.type for f in kind.fields if f.encode_name == name), None)
            data = data.get(name) if isinstance(data, dict) else None
        else:
            return None
    if isinstance(kind, msgspec.inspect.UnionType):  # Literal | None
        kind = next((t for t in kind.types if isinstance(t, msgspec.inspect.LiteralType)), None)
    return tuple(kind.values) if isinstance(kind, msgspec.inspect.LiteralType) else None


def parse_config(text: str, origin: str = "configuration") -> Config:
    """A Config from TOML text; ConfigError with one sentence on the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from exc
    try:
        return msgspec.convert(data, Config, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {_sentence(exc, data)}") from exc


def _decode_path(kind: type, value: object) -> object:
    """msgspec converts TOML strings to Path only through this hook."""
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")


def load_config(path: Path) -> Config:
    """Read and check the file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text") from exc
    return parse_config(text, str(path))
